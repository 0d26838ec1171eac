"""Per-user rows of a saved run: list, delete, export and import users, and the row surgery behind them.

A user's own parameters are one row of the user model (P-RLHF.md §2): the offset o_i (T_u*d values) of the
individual model, or the K mixture logits w_i of the cluster model. Everything else (e_0, the prototypes V_k,
the LM and its adapters) is shared. Row 0 is the generic user. Editing users = editing rows; the shared
parameters and every other row are copied bitwise, so other users' outputs do not change.

Files edited in place (user_model.safetensors, user_model.json, users.json) are written under temporary names
first and then `os.replace`d, so a reader sees either the old or the new version of each file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prlhf.config import TrainConfig, load_config_file
from prlhf.model.run_dir import RunError, base_location, write_json_atomic
from prlhf.users.models import UserModel, user_model_from_config
from prlhf.users.registry import UserRegistry

# (N+1, T_u*d) offsets, (N+1, K) mixture logits or (N+1, r) low-rank vectors
ROW_KEYS = {"individual": "offsets.weight", "cluster": "weights.weight", "lowrank": "vectors.weight"}
SHARED_KEYS = {"individual": ("generic",), "cluster": ("prototypes",), "lowrank": ("generic", "up")}
EXPORT_FORMAT = "prlhf-users/1"


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
    def rows(self) -> torch.Tensor:
        return self.state[ROW_KEYS[self.kind]]

    def with_rows(self, rows: torch.Tensor, registry: UserRegistry) -> "UserTable":
        """The same shared parameters with a new row table (row 0 = generic, rows 1..N = registry order)."""
        if rows.shape[0] != len(registry) + 1:
            raise ValueError(f"{rows.shape[0]} rows for {len(registry)} users (+1 generic)")
        state = dict(self.state)
        state[ROW_KEYS[self.kind]] = rows.contiguous()
        return UserTable({**self.config, "num_users": len(registry)}, state, registry)

    def to_module(self) -> UserModel:
        model = user_model_from_config(self.config)
        model.load_state_dict(self.state)
        return model


def require_personalized(kind: str, what: str) -> None:
    if kind not in ROW_KEYS:
        raise RunError(f"{what}: the run's user model is {kind!r} (vanilla DPO): it has no per-user embeddings")


def read_user_table(run_dir: str | os.PathLike) -> UserTable:
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise RunError(f"{run_dir}: not a finished run directory (no run.json)")
    config = json.loads((run_dir / "user_model.json").read_text())
    state = load_file(str(run_dir / "user_model.safetensors"))
    registry = UserRegistry.load(run_dir / "users.json")
    if config["num_users"] != len(registry):
        raise RunError(f"{run_dir}: users.json has {len(registry)} users but the user model has "
                       f"{config['num_users']}")
    return UserTable(config, state, registry)


def table_from_module(user_model: UserModel, registry: UserRegistry) -> UserTable:
    state = {k: v.detach().cpu().contiguous() for k, v in user_model.state_dict().items()}
    return UserTable(user_model.config(), state, registry)


def write_user_table(run_dir: str | os.PathLike, table: UserTable) -> None:
    """Write the three user files of a run: every file to a temporary name first, then os.replace each; then
    run.json's user count."""
    run_dir = Path(run_dir)
    staged = []
    for name, write in (("user_model.safetensors", lambda p: save_file(table.state, str(p))),
                        ("user_model.json", lambda p: p.write_text(json.dumps(table.config, indent=1) + "\n")),
                        ("users.json", lambda p: table.registry.save(p))):
        tmp = run_dir / f".{name}.tmp"
        write(tmp)
        staged.append((tmp, run_dir / name))
    for tmp, target in staged:
        os.replace(tmp, target)
    summary_path = run_dir / "run.json"  # its n_users counts the registry's users: keep it current
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("n_users") != len(table.registry):
            write_json_atomic(summary_path, {**summary, "n_users": len(table.registry)})


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
    table = read_user_table(run_dir)
    require_personalized(table.kind, "users delete")
    if user_id not in table.registry:
        raise RunError(f"users delete: user {user_id!r} is not in {run_dir} ({len(table.registry)} users; "
                       f"see `prlhf users list`)")
    idx = table.registry.index(user_id)
    rows = torch.cat([table.rows[:idx], table.rows[idx + 1:]])
    write_user_table(run_dir, table.with_rows(rows, registry_without(table.registry, user_id)))


# --------------------------------------------------------------------------------------- export / import


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.view(torch.uint8).numpy()
                          .tobytes()).hexdigest()


def base_identity(run_dir: str | os.PathLike) -> dict:
    """What base LM a run was trained on: the config's model string, plus, when the base is a local folder
    (the tiny model's RUN_DIR/base, or a local path), a hash of its input embedding matrix."""
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    config = TrainConfig(**load_config_file(TrainConfig, run_dir / "config.yaml"))
    location = base_location(run_dir, config)
    identity = {"model": config.model, "embedding_sha256": None}
    if Path(location).is_dir():
        base = AutoModelForCausalLM.from_pretrained(location)
        identity["embedding_sha256"] = tensor_sha256(base.get_input_embeddings().weight)
    return identity


def shape_config(config: dict) -> dict:
    """The user-model fields that must match for rows to be meaningful elsewhere (everything but N)."""
    return {k: v for k, v in config.items() if k != "num_users"}


def export_users(run_dir: str | os.PathLike, user_ids: Sequence[str], prefix: str | os.PathLike) -> list[Path]:
    """Write PREFIX.safetensors (rows, and for the individual model the full embeddings e_i) and PREFIX.json
    (base identity, user-model kind and shapes, hash of the shared parameters, the ids in row order)."""
    table = read_user_table(run_dir)
    require_personalized(table.kind, "users export")
    missing = [u for u in user_ids if u not in table.registry]
    if missing:
        raise RunError(f"users export: not in {run_dir}: {', '.join(repr(u) for u in missing)}")
    if not user_ids:
        raise RunError("users export: no user ids given")
    idx = torch.tensor([table.registry.index(u) for u in user_ids])
    tensors = {"rows": table.rows[idx].contiguous()}
    if table.kind == "individual":
        module = table.to_module()
        with torch.no_grad():
            tensors["embeddings"] = module(idx).contiguous()  # (n, T_u, d): e_i = e_0 + o_i
    meta = {"format": EXPORT_FORMAT, "base": base_identity(run_dir), "user_model": shape_config(table.config),
            "shared_sha256": shared_hash(table), "users": list(user_ids)}
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(prefix.name + ".safetensors"), prefix.with_name(prefix.name + ".json")]
    save_file(tensors, str(paths[0]) + ".tmp")
    os.replace(str(paths[0]) + ".tmp", paths[0])
    write_json_atomic(paths[1], meta)
    return paths


def shared_hash(table: UserTable) -> str:
    return hashlib.sha256("".join(tensor_sha256(table.state[k]) for k in SHARED_KEYS[table.kind]).encode()
                          ).hexdigest()


def import_users(run_dir: str | os.PathLike, prefix: str | os.PathLike, overwrite: bool = False) -> dict:
    """Add (or with overwrite, replace) the exported users' rows. Refuses another base model, another user-model
    kind or other shapes. Rows are copied as saved when the run's shared parameters (e_0 / prototypes) are the
    exporting run's; otherwise individual users keep their full embedding e_i (o_i = e_i - e_0 of this run) and
    cluster users are refused (their weights mean nothing over other prototypes).
    Returns {"added": [...], "replaced": [...], "rebased": bool}."""
    prefix = Path(prefix)
    meta_path = prefix.with_name(prefix.name + ".json")
    tensor_path = prefix.with_name(prefix.name + ".safetensors")
    if not meta_path.is_file() or not tensor_path.is_file():
        raise RunError(f"users import: {meta_path} and {tensor_path} are both needed (written by `users export`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise RunError(f"users import: {meta_path}: not a prlhf user export (format {meta.get('format')!r})")
    table = read_user_table(run_dir)
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
    tensors = load_file(str(tensor_path))
    rows, ids = tensors["rows"], list(meta["users"])
    if rows.shape[0] != len(ids) or tuple(rows.shape[1:]) != tuple(table.rows.shape[1:]):
        raise RunError(f"users import: {tensor_path}: rows {tuple(rows.shape)} do not fit {len(ids)} users of "
                       f"row size {tuple(table.rows.shape[1:])}")
    existing = [u for u in ids if u in table.registry]
    if existing and not overwrite:
        raise RunError(f"users import: already in {run_dir}: {', '.join(repr(u) for u in existing)} "
                       f"(pass --overwrite to replace them)")
    rebased = meta["shared_sha256"] != shared_hash(table)
    if rebased:
        if table.kind != "individual":
            raise RunError(f"users import: {prefix} comes from a run with other shared {table.kind} parameters; "
                           f"its rows only make sense over the prototypes / projection they were trained with")
        generic = table.state["generic"]  # (T_u, d)
        rows = (tensors["embeddings"] - generic.unsqueeze(0)).reshape(rows.shape).to(table.rows.dtype)
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
    write_user_table(run_dir, table.with_rows(new_rows, registry))
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
