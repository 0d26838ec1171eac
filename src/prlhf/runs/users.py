"""Per-user rows of a saved run: list, delete, export and import users, the row surgery behind them, and the
new run that `prlhf adapt` writes.

A user's own parameters are one row of the user model (P-RLHF.md §2): the offset o_i (T_u*d values) of the
individual model, the K mixture logits w_i of the cluster model, or the vector v_i of the low-rank model (the
kind says which: `UserModel.row_key`). Everything else (e_0, the prototypes V_k, U, the LM and its adapters) is
shared. Row 0 is the generic user. Editing users = editing rows; the shared
parameters and every other row are copied bitwise, so other users' outputs do not change.

A change (delete, import) is a new version of the run (prlhf.runs.directory): the three user files are written
with copies of the other artifacts into a new version folder, which run.json then makes current in one atomic
step, under the run's lock. A kill or a full disk leaves the run at its old version or its new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

from prlhf.config import ConfigError, TrainConfig, load_config_file
from prlhf.runs.directory import (LoadedRun, RunError, RunFiles, base_location, copy_artifacts, resolve_run, run_lock,
                                  write_version)
from prlhf.safe_io import (atomic_write_bytes, atomic_write_json, copy_file, copy_tree, fault_point, fsync_path,
                           fsync_tree, held_temp_dir, output_file_problem, remove_path, remove_stale_temp_dirs, rename)
from prlhf.users.models import UserModel, user_model_class, user_model_from_config
from prlhf.users.registry import UserRegistry

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "prlhf-users/1"
USER_FILES = ("user_model.safetensors", "user_model.json", "users.json")


@dataclass
class UserTable:
    """A run's user model as plain tensors: config (kind, N, T_u, d[, K]), state dict and registry."""

    config: dict
    state: dict[str, torch.Tensor]
    registry: UserRegistry

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def kind_class(self) -> type[UserModel]:
        return user_model_class(self.kind)

    @property
    def rows(self) -> torch.Tensor:
        """(N+1, R): the kind's per-user table (prlhf.users.models.UserModel.row_key)."""
        return self.state[self.kind_class.row_key]

    def with_rows(self, rows: torch.Tensor, registry: UserRegistry) -> "UserTable":
        """The same shared parameters with a new row table (row 0 = generic, rows 1..N = registry order)."""
        if rows.shape[0] != len(registry) + 1:
            raise ValueError(f"{rows.shape[0]} rows for {len(registry)} users (+1 generic)")
        state = dict(self.state)
        state[self.kind_class.row_key] = rows.contiguous()
        return UserTable({**self.config, "num_users": len(registry)}, state, registry)

    def to_module(self) -> UserModel:
        model = user_model_from_config(self.config)
        model.load_state_dict(self.state)
        return model


def require_personalized(kind: str, what: str) -> None:
    if user_model_class(kind).row_key is None:
        raise RunError(f"{what}: the run's user model is {kind!r} (vanilla DPO): it has no per-user embeddings")


def read_user_table(run_dir: str | os.PathLike) -> UserTable:
    return table_of(resolve_run(run_dir))


def table_of(run: RunFiles) -> UserTable:
    """The user table of a resolved run version (read once: the version it names)."""
    config = json.loads((run.files / "user_model.json").read_text())
    state = load_file(str(run.files / "user_model.safetensors"))
    registry = UserRegistry.load(run.files / "users.json")
    if config["num_users"] != len(registry):
        raise RunError(f"{run.root}: users.json has {len(registry)} users but the user model has "
                       f"{config['num_users']}")
    return UserTable(config, state, registry)


def table_from_module(user_model: UserModel, registry: UserRegistry) -> UserTable:
    state = {k: v.detach().cpu().contiguous() for k, v in user_model.state_dict().items()}
    return UserTable(user_model.config(), state, registry)


def stage_user_table(folder: Path, table: UserTable) -> None:
    """The three user files of a version, into a staging folder (prlhf.runs.directory.write_version)."""
    fault_point("version", "write user_model.safetensors")
    save_file(table.state, str(folder / "user_model.safetensors"))
    fault_point("version", "write user_model.json")
    (folder / "user_model.json").write_text(json.dumps(table.config, indent=1) + "\n")
    fault_point("version", "write users.json")
    table.registry.save(folder / "users.json")


def commit_user_table(run: RunFiles, table: UserTable, written_by: str) -> Path:
    """A new version of the run: its other artifacts as they are, the user files from `table`; the caller holds
    run_lock. run.json's n_users follows the registry."""
    if run.files != run.root and run.version != run.pointer.get("version"):
        raise RunError(f"{run.files}: an earlier version is read-only; change the run through {run.root}")

    def fill(folder: Path) -> None:
        copy_artifacts(run, folder, skip=USER_FILES)
        stage_user_table(folder, table)

    return write_version(run.root, fill, {**run.summary, "n_users": len(table.registry)}, written_by)


@contextmanager
def changing_run(run_dir: str | os.PathLike, what: str) -> Iterator[RunFiles]:
    """The run's current version, read under the run's lock, which is held until the change is committed."""
    root = resolve_run(run_dir, verify=False).root
    with run_lock(root, f"prlhf {what}"):
        yield resolve_run(run_dir)  # read again under the lock: another writer may have just committed


def write_user_table(run_dir: str | os.PathLike, table: UserTable, written_by: str = "users") -> Path:
    """Replace a run's user model and registry with `table`, as a new version."""
    with changing_run(run_dir, written_by) as run:
        return commit_user_table(run, table, written_by)


def registry_without(registry: UserRegistry, user_id: str) -> UserRegistry:
    return UserRegistry([u for u in registry.user_ids if u != user_id])  # renumbered 1..N-1 in the same order


# ---------------------------------------------------------------------------------------------------- list


def list_users(run_dir: str | os.PathLike, train_records: Sequence | None = None) -> list[dict]:
    """One row per seen user: id, index, L2 norm of the user's own row (o_i or w_i), training pairs (or None)."""
    table = read_user_table(run_dir)
    require_personalized(table.kind, "users list")
    counts = Counter(r.user_id for r in train_records) if train_records is not None else None
    rows = table.rows
    return [{"user_id": uid, "index": idx, "norm": float(rows[idx].float().norm()),
             "n_pairs": counts.get(uid, 0) if counts is not None else None}
            for uid, idx in table.registry.to_dict()["users"].items()]


def format_user_list(entries: list[dict]) -> str:
    width = max([len("user_id")] + [len(e["user_id"]) for e in entries])
    lines = [f"{'user_id':<{width}}  index      norm  pairs"]
    for e in entries:
        pairs = "-" if e["n_pairs"] is None else str(e["n_pairs"])
        lines.append(f"{e['user_id']:<{width}}  {e['index']:>5}  {e['norm']:>8.4f}  {pairs:>5}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- delete


def delete_user(run_dir: str | os.PathLike, user_id: str) -> None:
    """Drop the user's row and renumber the registry (indices stay 1..N without gaps). The id then maps to the
    generic user; every other user keeps their row, bitwise, at its (possibly lower) new index."""
    with changing_run(run_dir, "users delete") as run:
        table = table_of(run)
        require_personalized(table.kind, "users delete")
        if user_id not in table.registry:
            raise RunError(f"users delete: user {user_id!r} is not in {run_dir} ({len(table.registry)} users; "
                           f"see `prlhf users list`)")
        commit_user_table(run, table_without(table, user_id), "users delete")


def table_without(table: UserTable, user_id: str) -> UserTable:
    """The table with the user's row dropped and the registry renumbered; every other row kept bitwise."""
    idx = table.registry.index(user_id)
    rows = torch.cat([table.rows[:idx], table.rows[idx + 1:]])
    return table.with_rows(rows, registry_without(table.registry, user_id))


# --------------------------------------------------------------------------------------- export / import


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.view(torch.uint8).numpy()
                          .tobytes()).hexdigest()


def base_identity(run_dir: str | os.PathLike) -> dict:
    """What base LM a run was trained on: the config's model string, plus, when the base is a local folder
    (the tiny model's RUN_DIR/base, or a local path), a hash of its input embedding matrix."""
    from transformers import AutoModelForCausalLM

    run = resolve_run(run_dir)
    config_path = run.files / "config.yaml" if (run.files / "config.yaml").is_file() else run.root / "config.yaml"
    config = TrainConfig(**load_config_file(TrainConfig, config_path))
    location = base_location(run.root, config)
    identity = {"model": config.model, "embedding_sha256": None}
    if Path(location).is_dir():
        base = AutoModelForCausalLM.from_pretrained(location)
        identity["embedding_sha256"] = tensor_sha256(base.get_input_embeddings().weight)
    return identity


def shape_config(config: dict) -> dict:
    """The user-model fields that must match for rows to be meaningful elsewhere (everything but N)."""
    return {k: v for k, v in config.items() if k != "num_users"}


def export_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".safetensors"), prefix.with_name(prefix.name + ".json")


def is_user_export(meta_path: Path) -> bool:
    try:
        return json.loads(Path(meta_path).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_export_target(prefix: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a prefix whose files would replace something that is not an earlier export (unless `overwrite`), a
    run directory's own file (`--out RUN/users` would be RUN/users.json), a folder or a symlink."""
    tensor_path, meta_path = export_paths(prefix)
    for path in (tensor_path, meta_path):
        if problem := output_file_problem(path, overwrite, lambda _: is_user_export(meta_path)):
            raise RunError(f"users export: {path} {problem}")


def export_users(run_dir: str | os.PathLike, user_ids: Sequence[str], prefix: str | os.PathLike,
                 overwrite: bool = False) -> list[Path]:
    """Write PREFIX.safetensors (rows, and for the individual model the full embeddings e_i) and PREFIX.json
    (base identity, user-model kind and shapes, hash of the shared parameters, the ids in row order, and the
    sha256 of PREFIX.safetensors, which import checks: the pair is written one file after the other)."""
    check_export_target(prefix, overwrite)
    table = read_user_table(run_dir)
    require_personalized(table.kind, "users export")
    missing = [u for u in user_ids if u not in table.registry]
    if missing:
        raise RunError(f"users export: not in {run_dir}: {', '.join(repr(u) for u in missing)}")
    if not user_ids:
        raise RunError("users export: no user ids given")
    idx = torch.tensor([table.registry.index(u) for u in user_ids])
    tensors = {"rows": table.rows[idx].contiguous()}
    module = table.to_module()
    with torch.no_grad():
        embeddings = module(idx)  # (n, T_u, d)
        if module.rows_for_embeddings(embeddings) is not None:  # the kind can carry e_i to other shared params
            tensors["embeddings"] = embeddings.contiguous()
    blob = save(tensors)  # bytes
    meta = {"format": EXPORT_FORMAT, "base": base_identity(run_dir), "user_model": shape_config(table.config),
            "shared_sha256": shared_hash(table), "users": list(user_ids),
            "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    paths = export_paths(prefix)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    check_export_target(prefix, overwrite)  # again: the folder may have been created, or changed, meanwhile
    atomic_write_bytes(paths[0], blob)
    atomic_write_json(paths[1], meta)
    return list(paths)


def shared_hash(table: UserTable) -> str:
    return hashlib.sha256("".join(tensor_sha256(table.state[k]) for k in table.kind_class.shared_keys).encode()
                          ).hexdigest()


def import_users(run_dir: str | os.PathLike, prefix: str | os.PathLike, overwrite: bool = False) -> dict:
    """Add (or with overwrite, replace) the exported users' rows. Refuses another base model, another user-model
    kind or other shapes. Rows are copied as saved when the run's shared parameters (e_0 / prototypes) are the
    exporting run's; otherwise individual users keep their full embedding e_i (o_i = e_i - e_0 of this run) and
    cluster users are refused (their weights mean nothing over other prototypes).
    Returns {"added": [...], "replaced": [...], "rebased": bool}."""
    tensor_path, meta_path = export_paths(prefix)
    if not meta_path.is_file() or not tensor_path.is_file():
        raise RunError(f"users import: {meta_path} and {tensor_path} are both needed (written by `users export`)")
    if not is_user_export(meta_path):
        raise RunError(f"users import: {meta_path}: not a prlhf user export (no format {EXPORT_FORMAT!r})")
    meta = json.loads(meta_path.read_text())
    blob = tensor_path.read_bytes()
    if meta.get("tensors_sha256") not in (None, hashlib.sha256(blob).hexdigest()):  # None: exported before it
        raise RunError(f"users import: {tensor_path} is not the file {meta_path.name} was written with (export "
                       "again)")
    with changing_run(run_dir, "users import") as run:
        return _import_rows(run, Path(prefix), meta, load(blob), overwrite)


def _import_rows(run: RunFiles, prefix: Path, meta: dict, tensors: dict, overwrite: bool) -> dict:
    run_dir = run.root
    tensor_path = export_paths(prefix)[0]
    table = table_of(run)
    require_personalized(table.kind, "users import")
    want = shape_config(table.config)
    got = meta["user_model"]
    if got.get("kind") != table.kind:
        raise RunError(f"users import: {prefix} holds {got.get('kind')!r} users but {run_dir} has a "
                       f"{table.kind!r} user model")
    if got != want:
        raise RunError(f"users import: shape mismatch: {prefix} has {_shape_str(got)}, {run_dir} has "
                       f"{_shape_str(want)}")
    base = base_identity(run_dir)
    if meta["base"] != base:
        what = (f"model {meta['base']['model']!r} vs {base['model']!r}" if meta["base"]["model"] != base["model"]
                else "same model name but a different input embedding matrix")
        raise RunError(f"users import: {prefix} was exported from another base model than {run_dir} ({what})")
    rows, ids = tensors["rows"], list(meta["users"])
    if rows.shape[0] != len(ids) or tuple(rows.shape[1:]) != tuple(table.rows.shape[1:]):
        raise RunError(f"users import: {tensor_path}: rows {tuple(rows.shape)} do not fit {len(ids)} users of "
                       f"row size {tuple(table.rows.shape[1:])}")
    existing = [u for u in ids if u in table.registry]
    if existing and not overwrite:
        raise RunError(f"users import: already in {run_dir}: {', '.join(repr(u) for u in existing)} "
                       f"(pass --overwrite to replace them)")
    rebased = meta["shared_sha256"] != shared_hash(table)
    if rebased:  # keep each user's embedding e_i, as a row over this run's shared parameters
        carried = (table.to_module().rows_for_embeddings(tensors["embeddings"]) if "embeddings" in tensors
                   else None)
        if carried is None:
            raise RunError(f"users import: {prefix} comes from a run with other shared {table.kind} parameters; "
                           f"its rows only make sense over the prototypes / projection they were trained with")
        rows = carried.detach().reshape(rows.shape).to(table.rows.dtype)
    new_rows = table.rows.clone()
    registry = UserRegistry(table.registry.user_ids)
    extra = []
    for uid, row in zip(ids, rows):
        if uid in registry:
            new_rows[registry.index(uid)] = row
        else:
            registry.add(uid)
            extra.append(row)
    if extra:
        new_rows = torch.cat([new_rows, torch.stack(extra)])
    commit_user_table(run, table.with_rows(new_rows, registry), "users import")
    return {"added": [u for u in ids if u not in existing], "replaced": existing, "rebased": rebased}


def _shape_str(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(config.items()))


def extend_rows(table: UserTable, new_ids: Iterable[str], new_rows: torch.Tensor) -> UserTable:
    """Append rows for new users (indices N+1..); existing rows are copied bitwise."""
    registry = UserRegistry(table.registry.user_ids)
    for uid in new_ids:
        if uid in registry:
            raise ValueError(f"user {uid!r} is already in the registry")
        registry.add(uid)
    rows = torch.cat([table.rows, new_rows.to(table.rows.dtype)])
    return table.with_rows(rows, registry)


# ----------------------------------------------------------------------------------------- writing a new run


# What an adapted run copies from its source's top level besides the current version (not checkpoints/: they
# would resume the old run)
COPY_TOP = ("base", "config.yaml", "metrics.jsonl", "eval.jsonl")


def save_adapted_run(source: str | os.PathLike, new_run: LoadedRun, out: str | os.PathLike,
                     report: dict | None = None) -> Path:
    """A new run directory `out`: the source's base/ and logs, and as its version v1 the source's current artifacts
    with the extended user model and registry (and adapt.json). It is built in a temporary folder beside `out`
    and renamed into place in one step: a kill or a full disk leaves no `out` at all."""
    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not empty; choose another --out")
    run = resolve_run(source)
    table = table_from_module(new_run.model.user_model, new_run.registry)

    def fill(folder: Path) -> None:
        copy_artifacts(run, folder, skip=USER_FILES + ("adapt.json",))
        stage_user_table(folder, table)
        if report is not None:
            fault_point("version", "write adapt.json")
            (folder / "adapt.json").write_text(json.dumps({"adapted_from": str(source), **report}, indent=1) + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temp_dirs(out.parent, out.name):
        logger.info("removed %s, left by an adapt that was killed", stale)
    with held_temp_dir(out.parent, out.name) as tmp:
        try:
            for name in COPY_TOP:
                if os.path.lexists(src := run.root / name):
                    (copy_tree if src.is_dir() else copy_file)(src, tmp / name, "version")
            write_version(tmp, fill, {**run.summary, "n_users": len(new_run.registry)}, written_by="adapt")
            fsync_tree(tmp)
            if out.exists():
                out.rmdir()  # empty (checked above)
            try:
                rename(tmp, out, "version")
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another process wrote `out` meanwhile
                    raise ConfigError(f"{out}: already exists and is not empty; choose another --out") from None
                raise
            fsync_path(out.parent)
        except BaseException:
            remove_path(tmp, "cleanup")
            raise
    return out
