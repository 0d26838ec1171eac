"""Training metrics with the field's names, plus per-user summaries (never one key per user)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from prlhf.losses import PreferenceLossOutput
from prlhf.safe_io import atomic_write_text


def batch_metrics(out: PreferenceLossOutput, chosen_logps: torch.Tensor | None, rejected_logps: torch.Tensor | None,
                  generic: PreferenceLossOutput | None) -> dict[str, float]:
    """Means over the batch; `logps/*` only for a policy (a reward model has rewards, already under `rewards/*`)."""
    margins = out.chosen_rewards - out.rejected_rewards
    metrics = {
        "loss": out.losses.mean().item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
    }
    if chosen_logps is not None and rejected_logps is not None:
        metrics["logps/chosen"] = chosen_logps.detach().mean().item()
        metrics["logps/rejected"] = rejected_logps.detach().mean().item()
    if generic is not None:
        generic_correct = generic.chosen_rewards > generic.rejected_rewards
        metrics["generic/rewards/accuracies"] = generic_correct.float().mean().item()
        metrics["generic/loss"] = generic.losses.mean().item()
    return metrics


class PerUserAccuracy:
    """Running per-user share of pairs with positive implicit-reward margin, summarised as mean and worst."""

    def __init__(self):
        self.correct: dict[int, float] = defaultdict(float)
        self.total: dict[int, int] = defaultdict(int)

    def update(self, user_idx: torch.Tensor, margins: torch.Tensor) -> None:
        for u, ok in zip(user_idx.tolist(), (margins > 0).tolist()):
            self.correct[u] += ok
            self.total[u] += 1

    def summary(self, prefix: str = "users") -> dict[str, float]:
        if not self.total:
            return {}
        acc = [self.correct[u] / self.total[u] for u in self.total]
        return {f"{prefix}/mean_accuracy": sum(acc) / len(acc), f"{prefix}/worst_accuracy": min(acc),
                f"{prefix}/count": float(len(acc))}


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in sorted(keys)}


def gather_outputs(accelerator, out: PreferenceLossOutput, generic: PreferenceLossOutput | None,
                   *tensors: torch.Tensor):
    """Every process's per-example tensors of one micro-batch, concatenated in process order (each (B * P,)).

    `gather`, not `gather_for_metrics`: the duplicates Accelerate pads into an uneven last batch are trained on
    too, so the metrics describe exactly the examples the gradient saw."""
    def g(t: torch.Tensor) -> torch.Tensor:
        return accelerator.gather(t.detach().contiguous())

    out = PreferenceLossOutput(*(g(t) for t in out))
    generic = PreferenceLossOutput(*(g(t) for t in generic)) if generic is not None else None
    return out, generic, *(g(t) for t in tensors)


class TrainMetrics:
    """The metrics.jsonl rows: batch metrics averaged over the logging window, per-user accuracy over the
    epoch so far (summarised), all computed from the examples of every process. `with_logps=False` for a reward
    model, whose per-sequence outputs are rewards, not log-probs."""

    def __init__(self, with_logps: bool = True):
        self.window, self.per_user, self.with_logps = [], PerUserAccuracy(), with_logps
        self.finite = True  # the last micro-batch's losses, gathered: the same answer on every process

    def update(self, accelerator, out: PreferenceLossOutput, chosen_logps: torch.Tensor,
               rejected_logps: torch.Tensor, generic: PreferenceLossOutput | None, user_idx: torch.Tensor) -> None:
        out, generic, chosen_logps, rejected_logps, user_idx = gather_outputs(
            accelerator, out, generic, chosen_logps, rejected_logps, user_idx)
        self.finite = bool(torch.isfinite(out.losses).all())
        logps = (chosen_logps, rejected_logps) if self.with_logps else (None, None)
        self.window.append(batch_metrics(out, *logps, generic))
        self.per_user.update(user_idx.cpu(), (out.chosen_rewards - out.rejected_rewards).cpu())

    def row(self) -> dict[str, float]:
        """Summarise and start a new logging window."""
        row = {**mean_of(self.window), **self.per_user.summary("train_users")}
        self.window = []
        return row

    def new_epoch(self) -> None:
        self.per_user = PerUserAccuracy()

    def state_dict(self) -> dict:
        """The epoch's per-user counts (JSON), so a resumed run reports the same per-user accuracy."""
        return {"correct": dict(self.per_user.correct), "total": dict(self.per_user.total)}

    def load_state_dict(self, state: dict) -> None:
        self.per_user = PerUserAccuracy()
        self.per_user.correct.update({int(u): c for u, c in state["correct"].items()})
        self.per_user.total.update({int(u): n for u, n in state["total"].items()})


def tracker_names(report_to: str) -> list[str]:
    """`--report-to` -> Accelerate's `log_with`; auto = TensorBoard when it is installed, else nothing."""
    from accelerate.utils import is_tensorboard_available

    if report_to == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    return [] if report_to == "none" else [report_to]


def truncate_log(path: Path, last_step: int) -> None:
    """Drop metrics.jsonl rows after `last_step`: a run killed between logging and checkpointing logged steps
    that its resume will run (and log) again, and a row cut short by a kill while it was being appended."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if _logged_step(line) <= last_step]
        atomic_write_text(path, "".join(row + "\n" for row in rows))  # a kill here keeps the whole old log


def _logged_step(line: str) -> float:
    """The row's step; inf (so the row is dropped) for a partial last line."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
