"""Resumable checkpoints: trainable weights (safetensors), optimizer, scheduler and RNG (Accelerate state).

Each checkpoint is written under a temporary name and renamed into place, so a run killed mid-write leaves
the previous checkpoint intact; only the last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_only_hook(models, weights, output_dir) -> None:
    """Accelerate save hook: store just the trainable tensors (adapters, user model), not the frozen base."""
    for i, model in enumerate(models):
        model = getattr(model, "module", model)
        keep = {name for name, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in keep}


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return sorted(found)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, trainer_state: dict, keep: int) -> None:
    folder = run_dir / "checkpoints"
    tmp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_latest_checkpoint(accelerator: Accelerator, run_dir: Path) -> dict | None:
    """Restore the newest complete checkpoint; returns its trainer state, or None when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    _, path = found[-1]
    accelerator.load_state(str(path), strict=False)
    return json.loads((path / "trainer_state.json").read_text())
