"""What `prlhf train` checks and takes before its first step: an --out folder that is new or its own run, the
run's lock for the whole training, and on --resume a fingerprint of the data, the users and every shape-bearing
option that must match the checkpoint's (stored in its trainer_state.json).

Without the fingerprint, `--resume` with a data file whose user ids had changed continued the old rows under
the new ids: each new id got the trained row of whichever old user had the same sorted position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from prlhf.config import ConfigError, TrainConfig, short_repr, to_yaml
from prlhf.data.schema import PreferenceRecord
from prlhf.runs.directory import read_pointer, run_lock
from prlhf.safe_io import TMP_PREFIX, atomic_write_text, remove_path
from prlhf.train.checkpoint import TMP_STEP_PREFIX, list_checkpoints

# Options that give the saved tensors their shapes or their meaning, or decide which pairs a step sees (and so
# which batches a resume skips). Rates, epochs, max_steps and logging may change when a run is continued.
RESUME_OPTIONS = ("model", "objective", "loss", "user_model", "user_tokens", "clusters", "user_rank", "lora_r",
                  "lora_alpha", "lora_targets", "max_length", "max_prompt_length", "use_user_text", "batch_size",
                  "grad_accum", "group_by_length", "seed")
# What a warmed-up base/ is made from (the tiny model's tokenizer is trained on the data too)
BASE_KEYS = ("data_sha256", "model", "sft_steps", "sft_holdout", "seed", "batch_size", "max_length",
             "max_prompt_length", "use_user_text")


def records_sha256(records: Sequence[PreferenceRecord]) -> str:
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(dataclasses.asdict(record), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def train_fingerprint(config: TrainConfig, records: Sequence[PreferenceRecord]) -> dict:
    """The data, the user ids (the registry's order) and the shape-bearing options of a training run."""
    user_ids = sorted({r.user_id for r in records})  # UserRegistry.from_records' order
    return {"data_sha256": records_sha256(records), "n_pairs": len(records),
            "users_sha256": hashlib.sha256(json.dumps(user_ids).encode()).hexdigest(), "n_users": len(user_ids),
            "sft_steps": config.resolved_sft_steps(), "sft_holdout": config.sft_holdout,
            **{k: getattr(config, k) for k in RESUME_OPTIONS}}


def base_fingerprint(fingerprint: dict) -> dict:
    return {k: fingerprint[k] for k in BASE_KEYS}


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """What differs between a stored fingerprint and this run's, named for a one-line error."""
    found = []
    for key, value in now.items():
        if key not in saved or saved[key] == value or key in ("n_pairs", "n_users"):
            continue
        if key == "data_sha256":
            found.append(f"the data ({saved.get('n_pairs')} pairs then, {now['n_pairs']} now, other records)")
        elif key == "users_sha256":
            found.append(f"the user ids ({saved.get('n_users')} then, {now['n_users']} now, other ids)")
        else:
            found.append(f"{key} ({short_repr(saved[key], 60)} then, {short_repr(value, 60)} now)")
    return found


def is_main_rank() -> bool:
    """The launcher's process 0 (torchrun / accelerate launch set RANK), known before Accelerate starts."""
    return os.environ.get("RANK", "0") == "0"


# ------------------------------------------------------------------------------------------- the --out folder


def check_run_dir(run_dir: Path, resume: bool, probe_lock: bool = True) -> None:
    """Refuse an --out that is a file, another command's folder, or (without --resume) a run already there; with
    `probe_lock`, first one that another process is writing (the caller does not hold its lock)."""
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: is a file, not a run directory; choose another --out")
    if not run_dir.exists():
        return
    if probe_lock:
        with run_lock(run_dir, "prlhf train"):  # a run another process is writing: say so, not "unfinished"
            pass
    names = {p.name for p in run_dir.iterdir() if not p.name.startswith(TMP_PREFIX)}
    # only a config.yaml: a start that failed before training (e.g. the model did not load); safe to reuse
    if names <= {"config.yaml"}:
        return
    finished = "run.json" in names
    started = "config.yaml" in names  # what `prlhf train` writes first, and only it
    if resume:
        if not started:
            raise ConfigError(f"{run_dir}: not a run directory written by `prlhf train` (no config.yaml); --resume "
                              "continues a run in its own folder: choose another --out")
        if finished and not list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir}: a finished run without checkpoints (written by `prlhf adapt`, or its "
                              "checkpoints were removed) has nothing to resume from; train into another --out")
        return
    if not finished and ("checkpoints" in names or (started and names & {"base", "metrics.jsonl", "eval.jsonl"})):
        raise ConfigError(f"{run_dir}: holds an unfinished run; pass --resume to continue it, or choose another --out")
    raise ConfigError(f"{run_dir}: already exists and is not empty; choose another --out")


def check_resume(run_dir: Path, fingerprint: dict) -> None:
    """--resume continues only the run it was trained as: same data, users and shapes as its checkpoint."""
    pointer = read_pointer(run_dir)
    found = list_checkpoints(run_dir)
    written_by = (pointer or {}).get("written_by", "train")
    if found and written_by != "train":
        raise ConfigError(f"{run_dir}: its current version ({pointer.get('version')}) was written by `prlhf "
                          f"{written_by}` after training; continuing from {found[-1][1].name} would undo that "
                          "change: train into another --out")
    if not found:
        return
    path = found[-1][1]
    saved = json.loads((path / "trainer_state.json").read_text()).get("fingerprint")
    if saved is None:
        raise ConfigError(f"{path}: written by an older prlhf, without the fingerprint of its data and users that "
                          "--resume checks; train into another --out (or remove checkpoints/ to restart from scratch)")
    if differences := fingerprint_differences(saved, fingerprint):
        raise ConfigError(f"{run_dir}: --resume with other settings than {path.name} was trained with: "
                          f"{'; '.join(differences)}; resume with the same data and options, or train into another "
                          "--out")


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary folders a killed writer left behind (the caller holds the run's lock)."""
    for entry in run_dir.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            remove_path(entry, "cleanup")
    if (run_dir / "checkpoints").is_dir():
        for entry in (run_dir / "checkpoints").iterdir():
            if entry.name.startswith(TMP_STEP_PREFIX):
                remove_path(entry, "cleanup")


@contextmanager
def claim_run_dir(config: TrainConfig, fingerprint: dict) -> Iterator[None]:
    """On the main process: create --out, hold its lock until training ends, check it again under the lock (another
    `prlhf train` may have written it since the first check), check a resume and write config.yaml."""
    if not is_main_rank():
        yield
        return
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir, "prlhf train"):
        check_run_dir(run_dir, config.resume, probe_lock=False)
        if config.resume:
            check_resume(run_dir, fingerprint)
        remove_stale_temporaries(run_dir)
        atomic_write_text(run_dir / "config.yaml", to_yaml(config))
        yield
