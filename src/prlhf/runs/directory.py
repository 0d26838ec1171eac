"""What a run directory holds, how it changes (one atomic step per change), and loading it back.

A run directory is a transaction. Every command that writes or changes a run's artifacts (the final save of
`prlhf train`, continuing a finished run with --resume, `prlhf adapt`, `prlhf users delete|import`) writes a
complete new version beside the old one, fsyncs it, and makes it current with one atomic `os.replace` of
run.json. A kill or a full disk at any point leaves the run at its old version or at its new one.

    RUN_DIR/
      run.json                  the commit point, replaced atomically: {"version": "vN", "previous": "vM",
                                "written_by": "train" | "users delete" | ..., and the run's summary}
      versions/vN/              the current version, complete and never changed once written:
        adapter/                  LoRA adapter, PEFT format (adapter_config.json + adapter_model.safetensors)
        tokenizer/                the tokenizer used in training
        user_model.safetensors    user-model weights
        user_model.json           user-model config (kind, N, T_u, d, K)
        users.json                user-id registry (index 0 = generic)
        value_head.safetensors    reward runs only (objective rm): the scalar head
        config.yaml               the resolved training config this version was trained with
        adapt.json                runs written by `prlhf adapt`: where the new users came from
        manifest.json             every file above with its size and sha256, and the sha256 of base/manifest.json
      versions/vM/              the previous version, kept for recovery; older ones are deleted
      base/                     the base LM + tokenizer when it is not a hub id/folder (the built-in tiny model, or
                                any model after a warm-up): written once, atomically, with a manifest.json that
                                holds what it was built from, and the RNG state right after the warm-up
      config.yaml               the config of the latest `prlhf train` on this folder (written when it starts)
      metrics.jsonl             training log, one JSON object per logging step
      eval.jsonl                held-out accuracy during training (with --eval-data)
      checkpoints/step-N/       resumable state (trainable weights, optimizer, scheduler, RNG, fingerprint)

Loading checks the current version and base/ against their manifests and refuses, in one line that says how to
recover, a run that does not match or whose tensors hold NaN or inf. A version folder loads on its own
(`--run RUN_DIR/versions/vM`): that is how the previous version is reached. Writers hold `run_lock` (an flock
on RUN_DIR) and refuse to start while another process holds it; readers take no lock, since versions never
change and the one a reader resolved stays until two more have been committed.

Runs written before versions existed (the same files flat in RUN_DIR, no manifest) still load when their run.json
exists (the old save wrote it last); their first change writes versions/v1 and removes the flat files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from prlhf.config import TrainConfig, load_config_file, to_yaml
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import EncodedPair, adds_bos, encode_as_configured
from prlhf.model.loading import ensure_pad_token, load_base
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.reward import VALUE_HEAD_FILE, PersonalizedRewardModel
from prlhf.safe_io import (MANIFEST, TMP_PREFIX, atomic_write_json, atomic_write_text, copy_file, copy_tree,
                           fault_point, folder_lock, fsync_path, make_temp_dir, manifest_problem, remove_path, rename,
                           write_manifest)
from prlhf.users.models import user_model_from_config
from prlhf.users.registry import UserRegistry

RUN_FORMAT = "prlhf-run/2"
VERSIONS = "versions"
_VERSION_NAME = re.compile(r"^v(\d+)$")
POINTER_KEYS = ("format", "version", "previous", "written_by")
# what a version holds (a run written before versions existed holds them flat in RUN_DIR)
ARTIFACTS = ("adapter", "tokenizer", "user_model.safetensors", "user_model.json", "users.json", VALUE_HEAD_FILE,
             "config.yaml", "adapt.json")


class RunError(ValueError):
    """A run directory that is missing, unfinished, damaged or inconsistent; one-line message."""


@dataclass
class LoadedRun:
    model: PersonalizedLM
    tokenizer: PreTrainedTokenizerBase
    registry: UserRegistry
    config: TrainConfig
    path: Path

    def encode(self, records: Sequence[PreferenceRecord]) -> list[EncodedPair]:
        """Token ids of `records` as this run was trained: its tokenizer, lengths and use_user_text."""
        return encode_as_configured(records, self.tokenizer, self.config)


@dataclass(frozen=True)
class RunFiles:
    """Where a run's current artifacts are: `files` is RUN_DIR/versions/vN (RUN_DIR itself for an old flat run)."""

    root: Path
    files: Path
    version: str | None
    pointer: dict

    @property
    def summary(self) -> dict:
        """run.json without the pointer's own keys: what `prlhf train` printed (steps, n_users, ...)."""
        return {k: v for k, v in self.pointer.items() if k not in POINTER_KEYS}


# ------------------------------------------------------------------------------------------------ reading


def read_pointer(root: Path) -> dict | None:
    """run.json, or None when there is none (a run that never finished its first save)."""
    path = root / "run.json"
    if not os.path.lexists(path):
        return None
    try:
        pointer = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({exc.__class__.__name__}); {recovery_hint(root, None)}") from None
    if not isinstance(pointer, dict):
        raise RunError(f"{path}: not a run summary; {recovery_hint(root, None)}")
    return pointer


def version_names(root: Path) -> list[str]:
    """The committed-looking version folders under RUN_DIR/versions, oldest first."""
    folder = root / VERSIONS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p.name) for p in folder.iterdir() if (m := _VERSION_NAME.match(p.name))]
    return [name for _, name in sorted(found)]


def resolve_run(path: str | os.PathLike, verify: bool = True) -> RunFiles:
    """The run at `path` (a run directory, or one of its version folders), checked against its manifest."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: run directory not found")
    if path.parent.name == VERSIONS and _VERSION_NAME.match(path.name) and (path / MANIFEST).is_file():
        root, version = path.parent.parent, path.name  # an explicit version, e.g. the previous one
        try:
            pointer = read_pointer(root) or {}
        except RunError:  # the way back when run.json itself is damaged
            pointer = {}
        files = path
    else:
        root, pointer = path, read_pointer(path)
        if pointer is None:
            raise RunError(f"{path}: not a finished run (no run.json); train it, or resume it with --resume")
        version = pointer.get("version")
        if version is not None and not (isinstance(version, str) and _VERSION_NAME.match(version)):
            raise RunError(f"{root}/run.json names no valid version ({str(version)[:40]!r}); "
                           f"{recovery_hint(root, None)}")
        files = root / VERSIONS / version if version else root
    if verify and version is not None:
        problem = "its folder is missing" if not files.is_dir() else manifest_problem(files)
        problem = problem or base_problem(root, files)
        if problem:
            raise RunError(f"{root}: version {version} is damaged ({problem}); {recovery_hint(root, version)}")
    return RunFiles(root, files, version, pointer)


def current_version(run_dir: str | os.PathLike) -> Path:
    """The folder holding a run's current artifacts (verified)."""
    return resolve_run(run_dir).files


def base_problem(root: Path, files: Path) -> str | None:
    """Whether base/ is whole and is the one the version was saved with (None: it is)."""
    try:
        expected = json.loads((files / MANIFEST).read_text()).get("base_manifest_sha256")
    except (OSError, ValueError, AttributeError):
        return f"{MANIFEST} is unreadable"
    base = root / "base"
    if expected is None:
        return None
    if not (base / MANIFEST).is_file():
        return "base/ is missing or incomplete"
    if manifest_sha256(base) != expected:
        return "base/ is not the base this version was saved with"
    problem = manifest_problem(base)
    return f"base/{problem}" if problem else None


def manifest_sha256(folder: Path) -> str | None:
    path = folder / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def recovery_hint(root: Path, damaged: str | None) -> str:
    """How to get a loadable run back, in a few words: an intact earlier version, or a resume."""
    for name in reversed(version_names(root)):
        intact = manifest_problem(root / VERSIONS / name) is None and base_problem(root, root / VERSIONS / name) is None
        if name != damaged and intact:
            return f"an intact earlier version is {root / VERSIONS / name} (pass it as --run)"
    if (root / "checkpoints").is_dir():
        return ("rewrite it from the last checkpoint with `prlhf train --resume` (changes made by `prlhf users` "
                "or `adapt` after training are not in it)")
    return "no intact version or checkpoint is left: train it again"


def base_location(run_dir: Path, config: TrainConfig) -> str:
    return str(run_dir / "base") if (run_dir / "base").is_dir() else config.model


# ------------------------------------------------------------------------------------------------ writing


@contextmanager
def run_lock(run_dir: Path, what: str) -> Iterator[None]:
    """Exclusive right to change `run_dir` (which must exist); a second writer gets a one-line RunError."""
    with folder_lock(Path(run_dir), RunError, what):
        yield


def write_version(run_dir: Path, fill: Callable[[Path], None], summary: dict, written_by: str) -> Path:
    """Write a new version of the run with `fill(folder)` and make it current; the caller holds run_lock.

    Points a kill can hit, in order: the removal of what an earlier killed writer left (staging folders, versions
    it never committed), the staging folder's files, its rename to versions/vN (not yet current), the replace of
    run.json (the commit), and the removal of versions older than the previous one."""
    versions = run_dir / VERSIONS
    versions.mkdir(exist_ok=True)
    pointer = read_pointer(run_dir)
    current = pointer.get("version") if pointer else None
    legacy = pointer is not None and current is None
    prune_versions(run_dir, keep={current, (pointer or {}).get("previous")})
    number = 1 + max([int(name[1:]) for name in version_names(run_dir)], default=0)
    final = versions / f"v{number}"
    staging = make_temp_dir(versions, final.name)
    try:
        fill(staging)
        write_manifest(staging, "version", base_manifest_sha256=manifest_sha256(run_dir / "base"))
        rename(staging, final, "version")
        fsync_path(versions)
        atomic_write_json(run_dir / "run.json", {**summary, "format": RUN_FORMAT, "version": final.name,
                                                 "previous": current, "written_by": written_by}, "version")
    except BaseException as exc:
        if _committed(run_dir, final.name):  # it failed after the commit (e.g. an fsync): the new version holds
            raise
        for leftover in (staging, final):
            if os.path.lexists(leftover):
                remove_path(leftover, "cleanup")
        if isinstance(exc, OSError):  # a full disk, say
            still = f"still at {current}" if current else "not written"
            raise RunError(f"{run_dir}: could not write version {final.name} ({exc.strerror or exc}); the run is "
                           f"unchanged ({still})") from exc
        raise
    prune_versions(run_dir, keep={final.name, current}, legacy=legacy)
    return final


def _committed(run_dir: Path, version: str) -> bool:
    try:
        return (read_pointer(run_dir) or {}).get("version") == version
    except RunError:
        return False


def prune_versions(run_dir: Path, keep: set, legacy: bool = False) -> None:
    """Remove versions not in `keep`, staging leftovers and (after a first versioned save of an old flat run)
    its flat artifacts; the caller holds run_lock."""
    for entry in sorted((run_dir / VERSIONS).iterdir()):
        if entry.name.startswith(TMP_PREFIX) or (_VERSION_NAME.match(entry.name) and entry.name not in keep):
            remove_path(entry, "prune")
    if legacy:
        for name in ARTIFACTS:
            if name != "config.yaml":
                remove_path(run_dir / name, "prune")


def copy_artifacts(source: RunFiles, folder: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the source version's artifacts (all but `skip`) into a staging folder."""
    for name in ARTIFACTS:
        src = source.files / name
        if name in skip or not os.path.lexists(src):
            continue
        (copy_tree if src.is_dir() else copy_file)(src, folder / name, "version")


def save_run(run_dir: Path, model: PersonalizedLM, tokenizer: PreTrainedTokenizerBase, registry: UserRegistry,
             summary: dict, config: TrainConfig | None = None) -> Path:
    """Write the trained artifacts as a new version of `run_dir` and make it current (the caller holds run_lock);
    `config` defaults to RUN_DIR/config.yaml, the config this training started with."""

    def fill(folder: Path) -> None:
        fault_point("version", "write adapter")
        model.lm.save_pretrained(folder / "adapter")
        fault_point("version", "write tokenizer")
        tokenizer.save_pretrained(folder / "tokenizer")
        fault_point("version", "write user_model.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.user_model.state_dict().items()},
                  str(folder / "user_model.safetensors"))
        if isinstance(model, PersonalizedRewardModel):
            fault_point("version", f"write {VALUE_HEAD_FILE}")
            save_file({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()},
                      str(folder / VALUE_HEAD_FILE))
        fault_point("version", "write user_model.json")
        (folder / "user_model.json").write_text(json.dumps(model.user_model.config(), indent=1) + "\n")
        fault_point("version", "write users.json")
        registry.save(folder / "users.json")
        if config is not None:
            fault_point("version", "write config.yaml")
            (folder / "config.yaml").write_text(to_yaml(config))
        else:
            copy_file(run_dir / "config.yaml", folder / "config.yaml", "version")

    return write_version(run_dir, fill, summary, written_by="train")


def write_json_atomic(path: Path, data) -> None:
    """Replace `path` with `data` as JSON through an exclusive temporary file (never through a symlink)."""
    atomic_write_json(Path(path), data)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write_text(Path(path), text)


# ------------------------------------------------------------------------------------------------ loading


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRun:
    run = resolve_run(run_dir)
    root, files = run.root, run.files
    config_path = files / "config.yaml" if (files / "config.yaml").is_file() else root / "config.yaml"
    config = TrainConfig(**load_config_file(TrainConfig, config_path))
    base, _ = load_base(base_location(root, config))
    tokenizer = AutoTokenizer.from_pretrained(files / "tokenizer")
    ensure_pad_token(tokenizer, base)
    lm = PeftModel.from_pretrained(base, files / "adapter")
    user_model = user_model_from_config(json.loads((files / "user_model.json").read_text()))
    user_model.load_state_dict(load_file(str(files / "user_model.safetensors")))
    registry = UserRegistry.load(files / "users.json")
    where = f"{root} (version {run.version})" if run.version else str(root)
    if len(registry) != user_model.num_users:
        raise RunError(f"{where}: users.json has {len(registry)} users but the user model has "
                       f"{user_model.num_users}")
    if config.objective == "rm":
        model = PersonalizedRewardModel(lm, user_model, int(adds_bos(tokenizer)), base.config.hidden_size,
                                        pool=config.reward_pool)
        model.value_head.load_state_dict(load_file(str(files / VALUE_HEAD_FILE)))
    else:
        model = PersonalizedLM(lm, user_model, prefix_len=int(adds_bos(tokenizer)))
    check_finite(model, where, root, run.version)
    model = model.to(device).eval()
    return LoadedRun(model, tokenizer, registry, config, Path(run_dir))


def check_finite(model: torch.nn.Module, where: str, root: Path, version: str | None) -> None:
    """Refuse weights that hold NaN or inf (a run saved from diverged weights, or edited by hand)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise RunError(f"{where}: {name} holds NaN or infinite values; {recovery_hint(root, version)}")


def is_eval_result(path: Path) -> bool:
    """A metrics JSON that `prlhf eval --out` wrote (which eval --out may replace without --overwrite)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"accuracy", "per_user"} <= set(doc)
