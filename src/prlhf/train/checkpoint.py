"""Resumable checkpoints in a format that loads without unpickling code.

A checkpoint `RUN_DIR/checkpoints/step-N/` holds
- `model.safetensors`: the trainable tensors only (LoRA adapters, user model), not the frozen base;
- `optimizer.bin`, `scheduler.bin`: `state_dict()`s written with `torch.save`, read with
  `torch.load(weights_only=True)` (tensors, numbers, strings and containers only);
- `rng_state_{process}.bin`: python `random`, numpy and torch CPU/CUDA generator states as tensors and numbers,
  one file per process (each process draws its own dropout masks);
- `trainer_state.json`: step, epoch, batches seen in the epoch, Accelerate's accumulation counter.

We do not use `Accelerator.save_state` / `load_state`: accelerate 1.15 reads the registered custom objects (our
scheduler, `custom_checkpoint_0.pkl`) with `torch.load(weights_only=False)`, i.e. it unpickles arbitrary code.

Each checkpoint is written into `checkpoints/.tmp-step-N` (created exclusively, under the run's lock, after any
leftover of a killed run is removed), fsynced, and renamed into place, so a run killed mid-write leaves the
previous checkpoint intact; `trainer_state.json` (written last) also holds the fingerprint that --resume checks
(prlhf.train.run_start) and `manifest.json` the size and sha256 of every file, checked when it is loaded. Only
the last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from prlhf.config import ConfigError
from prlhf.safe_io import fault_point, fsync_path, manifest_problem, remove_path, rename, write_manifest

_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_STEP_PREFIX = ".tmp-step-"


@dataclass
class Trainable:
    """What a checkpoint saves and restores besides the trainer state (model/optimizer as prepared)."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return sorted(found)


def trainable_state(trainable: Trainable) -> dict[str, torch.Tensor]:
    """Full (gathered under FSDP / ZeRO-3) state of the trainable parameters, on the CPU."""
    model = trainable.accelerator.unwrap_model(trainable.model)
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    state = trainable.accelerator.get_state_dict(trainable.model)
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k in keep}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainable: Trainable, run_dir: Path, step: int, trainer_state: dict, keep: int) -> None:
    accelerator = trainable.accelerator
    folder = run_dir / "checkpoints"
    tmp, final = folder / f"{TMP_STEP_PREFIX}{step}", folder / f"step-{step}"
    if accelerator.is_main_process:
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(f"{TMP_STEP_PREFIX}*"):  # left by a run killed while writing
            remove_path(stale, "checkpoint")
        os.mkdir(tmp)  # exclusive: fails on anything planted at the name
    accelerator.wait_for_everyone()
    weights = trainable_state(trainable)  # a collective under FSDP / ZeRO-3: every process takes part
    fault_point("checkpoint", "write rng_state")
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.bin")
    if accelerator.is_main_process:
        fault_point("checkpoint", "write model.safetensors")
        save_file(weights, str(tmp / "model.safetensors"))
        fault_point("checkpoint", "write optimizer.bin")
        torch.save(trainable.optimizer.state_dict(), tmp / "optimizer.bin")
        torch.save(trainable.scheduler.state_dict(), tmp / "scheduler.bin")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.bin")
    accelerator.wait_for_everyone()  # every process's RNG state is in
    if accelerator.is_main_process:
        state = trainer_state | {"accumulation_step": accelerator.step}
        fault_point("checkpoint", "write trainer_state.json")
        (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")  # last: marks the checkpoint complete
        write_manifest(tmp, "checkpoint")  # and fsyncs every file
        if os.path.lexists(final):  # a step written again (a continued run with other --save-steps)
            remove_path(final, "checkpoint")
        rename(tmp, final, "checkpoint")
        fsync_path(folder)
        for _, old in list_checkpoints(run_dir)[:-keep]:
            remove_path(old, "checkpoint")
    accelerator.wait_for_everyone()


def load_latest_checkpoint(trainable: Trainable, run_dir: Path) -> dict | None:
    """Restore the newest complete checkpoint; returns its trainer state, or None when there is none."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    _, path = found[-1]
    if (path / "manifest.json").is_file() and (problem := manifest_problem(path)):  # older ones have none
        older = f"remove it to resume from {found[-2][1].name}" if len(found) > 1 else "train into another --out"
        raise ConfigError(f"{path}: damaged checkpoint ({problem}); {older}")
    accelerator = trainable.accelerator
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # the weights would load, but the optimizer state here is rank 0's shard only
        raise ConfigError(f"--resume is not supported under {accelerator.distributed_type.value} yet")
    model = accelerator.unwrap_model(trainable.model)
    weights = load_file(str(path / "model.safetensors"))  # on the CPU; load_state_dict copies onto the device
    unknown = set(weights) - set(model.state_dict())
    if unknown:
        raise ValueError(f"{path}: checkpoint tensors not in the model: {sorted(unknown)[:3]}")
    model.load_state_dict(weights, strict=False)  # strict=False: the frozen base is not in the checkpoint
    trainable.optimizer.load_state_dict(torch.load(path / "optimizer.bin", map_location="cpu", weights_only=True))
    trainable.scheduler.load_state_dict(torch.load(path / "scheduler.bin", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.bin").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.bin", weights_only=True))
    rng_file = path / f"rng_state_{accelerator.process_index}.bin"
    if rng_file.is_file():  # absent when resuming on more processes than the run had
        set_rng_state(torch.load(rng_file, weights_only=True))
    state = json.loads((path / "trainer_state.json").read_text())
    accelerator.step = state.get("accumulation_step", 0)
    return state
