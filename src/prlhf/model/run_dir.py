"""What a run directory holds, and loading it back.

    RUN_DIR/
      config.yaml               resolved training config
      base/                     the base LM + tokenizer when it is not a hub id/folder (the built-in tiny model)
      tokenizer/                the tokenizer used in training
      adapter/                  LoRA adapter, PEFT format (adapter_config.json + adapter_model.safetensors)
      user_model.safetensors    user-model weights
      user_model.json           user-model config (kind, N, T_u, d, K)
      users.json                user-id registry (index 0 = generic)
      value_head.safetensors    reward runs only (objective rm): the scalar head
      eval.jsonl                held-out accuracy during training (with --eval-data)
      metrics.jsonl             training log, one JSON object per logging step
      checkpoints/step-N/       resumable state (trainable weights, optimizer, scheduler, RNG)
      run.json                  written last: the run finished and the files above are complete
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from prlhf.config import TrainConfig, load_config_file
from prlhf.data.tokenize import adds_bos
from prlhf.model.loading import ensure_pad_token, load_base
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.reward import VALUE_HEAD_FILE, PersonalizedRewardModel
from prlhf.users.models import user_model_from_config
from prlhf.users.registry import UserRegistry


class RunError(ValueError):
    """A run directory that is missing, unfinished or inconsistent; one-line message."""


@dataclass
class LoadedRun:
    model: PersonalizedLM
    tokenizer: PreTrainedTokenizerBase
    registry: UserRegistry
    config: TrainConfig
    path: Path


def base_location(run_dir: Path, config: TrainConfig) -> str:
    return str(run_dir / "base") if (run_dir / "base").is_dir() else config.model


def save_run(run_dir: Path, model: PersonalizedLM, tokenizer: PreTrainedTokenizerBase, registry: UserRegistry,
             summary: dict) -> None:
    """Write the final artifacts into a temporary folder, then move each into place; run.json goes last."""
    tmp = run_dir / ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.lm.save_pretrained(tmp / "adapter")
    tokenizer.save_pretrained(tmp / "tokenizer")
    state = {k: v.detach().cpu().contiguous() for k, v in model.user_model.state_dict().items()}
    save_file(state, str(tmp / "user_model.safetensors"))
    if isinstance(model, PersonalizedRewardModel):
        head = {k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()}
        save_file(head, str(tmp / VALUE_HEAD_FILE))
    (tmp / "user_model.json").write_text(json.dumps(model.user_model.config(), indent=1) + "\n")
    registry.save(tmp / "users.json")
    for entry in tmp.iterdir():
        target = run_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    write_json_atomic(run_dir / "run.json", summary)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRun:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    if not (run_dir / "run.json").is_file():
        raise RunError(f"{run_dir}: not a finished run (no run.json); train it, or resume it with --resume")
    config = TrainConfig(**load_config_file(TrainConfig, run_dir / "config.yaml"))
    base, _ = load_base(base_location(run_dir, config))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    ensure_pad_token(tokenizer, base)
    lm = PeftModel.from_pretrained(base, run_dir / "adapter")
    user_model = user_model_from_config(json.loads((run_dir / "user_model.json").read_text()))
    user_model.load_state_dict(load_file(str(run_dir / "user_model.safetensors")))
    registry = UserRegistry.load(run_dir / "users.json")
    if len(registry) != user_model.num_users:
        raise RunError(f"{run_dir}: users.json has {len(registry)} users but the user model has "
                       f"{user_model.num_users}")
    if config.objective == "rm":
        model = PersonalizedRewardModel(lm, user_model, int(adds_bos(tokenizer)), base.config.hidden_size)
        model.value_head.load_state_dict(load_file(str(run_dir / VALUE_HEAD_FILE)))
    else:
        model = PersonalizedLM(lm, user_model, prefix_len=int(adds_bos(tokenizer)))
    model = model.to(device).eval()
    return LoadedRun(model, tokenizer, registry, config, run_dir)
