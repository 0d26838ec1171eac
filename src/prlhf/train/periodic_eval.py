"""Held-out evaluation during training (`--eval-data`, `--eval-steps`): learning curves in RUN/eval.jsonl."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from prlhf.config import TrainConfig
from prlhf.data.loading import load_records
from prlhf.data.tokenize import encode_as_configured
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.scoring import compute_reference_logps, implicit_reward_margins, per_user_accuracy
from prlhf.users.registry import UserRegistry

SUMMARY_KEYS = ("accuracy", "mean_user_accuracy", "worst_user_accuracy", "unseen_accuracy")


@contextmanager
def weights_precision(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Score at the weights' own precision, as `prlhf eval` does after training. Under mixed precision,
    Accelerate's prepare() sets an autocast wrapper as the instance's `forward`, and the wrapper re-enters
    autocast whatever the caller's context. bf16 log-probs flip the sign of small margins (5 of 40 pairs of a
    briefly trained SmolLM2 run). So the class's forward is used meanwhile, and the wrapper put back for
    training."""
    wrapper = model.__dict__.pop("forward", None)
    try:
        yield model
    finally:
        if wrapper is not None:
            model.forward = wrapper


def eval_files(config: TrainConfig) -> list[str]:
    return [p.strip() for p in config.eval_data.split(",") if p.strip()]


def load_eval_records(config: TrainConfig) -> dict[str, list]:
    """split name (file stem) -> records; called before anything is written, so bad files fail early."""
    return {Path(path.split("::")[0]).stem: load_records(path) for path in eval_files(config)}


class PeriodicEval:
    """Per-user implicit-reward accuracy on each held-out file; the reference log-probs are computed once."""

    def __init__(self, splits: dict[str, list], config: TrainConfig, tokenizer, registry: UserRegistry,
                 log_path: Path):
        self.records = splits
        self.pairs = {name: encode_as_configured(recs, tokenizer, config) for name, recs in splits.items()}
        self.pad_id = tokenizer.pad_token_id
        self.registry = registry
        self.log_path = log_path
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, model: PersonalizedLM, step: int) -> list[dict]:
        rows = []
        with weights_precision(model), torch.autocast(next(model.parameters()).device.type, enabled=False):
            for name, pairs in self.pairs.items():
                if name not in self.reference and not getattr(model, "is_reward_model", False):
                    self.reference[name] = compute_reference_logps(model, pairs, self.pad_id, show_progress=False)
                margins = implicit_reward_margins(model, pairs, self.registry, self.pad_id,
                                                  reference=self.reference.get(name))  # (N,)
                result = per_user_accuracy(self.records[name], margins, self.registry)
                rows.append({"step": step, "split": name, **{k: result[k] for k in SUMMARY_KEYS},
                             "mean_margin": margins.mean().item()})
        with self.log_path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return rows
