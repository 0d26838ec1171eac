"""`prlhf export`: a policy run as files that an inference engine taking prompt embeddings can serve without prlhf.

    OUT/
      model/               the base with the LoRA adapters merged in (safetensors) + the run's tokenizer
      users.safetensors    `embeddings` (N+1, T_u, d): the user model's output for every index, row 0 = generic
      users.json           the run's user-id registry (same format)
      export.json          {format, run, version, num_user_tokens, prefix_len, hidden_size, use_user_text, ...}
      prompt_embeds.py     standalone PromptEmbedder (prlhf.serve.prompt_embeds, copied verbatim)
      manifest.json        every file above with its size and sha256 (prlhf.safe_io)

OUT is built in a temporary folder beside it and renamed into place: it exists whole or not at all.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prlhf import __version__
from prlhf.config import ConfigError
from prlhf.data.tokenize import adds_bos
from prlhf.runs.directory import LoadedRun, RunError, RunFiles, load_run, resolve_run
from prlhf.safe_io import (copy_file, fsync_path, held_temp_dir, looks_like_run, remove_path,
                           remove_stale_temp_dirs, rename, write_manifest)
from prlhf.serve import prompt_embeds
from prlhf.serve.prompt_embeds import EXPORT_FORMAT, USERS_FILE, USERS_TENSOR
from prlhf.users.models import UserModel

CHUNK_BYTES = 64 << 20  # the user table is computed and written this much at a time, whatever its size
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the export of the policy run `run_dir` to the new (or empty) folder `out_dir`; returns it."""
    out = Path(out_dir)
    if problem := out_problem(out):  # before any work
        raise ConfigError(f"export: --out {out} {problem}")
    files = resolve_run(run_dir, verify=False)  # load_run checks the manifests, once
    # load the version just resolved, so that export.json names the version that was exported
    run = load_run(files.files if files.version else files.root)
    if getattr(run.model, "is_reward_model", False):
        raise RunError(f"{run_dir}: a reward-model run has no policy to export (export a run trained with "
                       "objective dpo)")
    out.parent.mkdir(parents=True, exist_ok=True)
    label = f"export-{out.name}"
    remove_stale_temp_dirs(out.parent, label)  # what an export killed midway left
    with held_temp_dir(out.parent, label) as tmp:
        try:
            fill_export(tmp, run, files)
            write_manifest(tmp, "export")
            commit(tmp, out)
        except BaseException:
            remove_path(tmp, "cleanup")
            raise
    return out


def out_problem(out: Path) -> str | None:
    """Why `out` must not receive an export (None: it may): only a new or empty folder outside a run's internals."""
    if out.is_symlink():
        return "is a symlink (prlhf does not write through symlinks)"
    if out.exists() and not out.is_dir():
        return "is a file, not a folder"
    if out.is_dir() and any(out.iterdir()):
        return "already exists and is not empty; choose another --out"
    where = Path(os.path.abspath(out))
    for child, parent in zip([where, *where.parents], where.parents):
        if child.name in ("versions", "checkpoints", "base") and looks_like_run(parent):
            return f"is inside the run directory {parent}'s own files"  # files a manifest must match exactly
    return None


def commit(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out` (replacing an empty folder there) and make the name durable."""
    try:
        rename(tmp, out, "export")
    except OSError as exc:  # something appeared at `out` while the export was being built
        raise ConfigError(f"export: --out {out} could not be written ({exc.strerror or exc}); nothing was "
                          "changed there") from None
    fsync_path(out.parent)


def fill_export(folder: Path, run: LoadedRun, files: RunFiles) -> None:
    """Write the export's files into `folder`. Merges the LoRA adapters into `run`'s own model, which
    export_run loaded for this alone."""
    lm = run.model.lm
    merged = (lm.merge_and_unload() if isinstance(lm, PeftModel) else lm).eval()
    merged.save_pretrained(folder / "model")  # safetensors
    run.tokenizer.save_pretrained(folder / "model")
    source = input_embedding_source(merged, folder)
    write_user_table(folder / USERS_FILE, run.model.user_model)
    run.registry.save(folder / "users.json")
    copy_file(Path(prompt_embeds.__file__), folder / "prompt_embeds.py", "export")
    weight = merged.get_input_embeddings().weight  # (V, d)
    user_model = run.model.user_model
    meta = {"format": EXPORT_FORMAT, "run": str(files.root.absolute()), "version": files.version,
            "num_users": user_model.num_users, "num_user_tokens": user_model.num_tokens,
            "user_model": user_model.kind, "prefix_len": int(adds_bos(run.tokenizer)),
            "hidden_size": int(weight.shape[1]), "use_user_text": run.config.use_user_text,
            "dtype": str(weight.dtype).removeprefix("torch."), "base_model": run.config.model,
            "bos_token_id": run.tokenizer.bos_token_id, "eos_token_id": run.tokenizer.eos_token_id,
            "pad_token_id": run.tokenizer.pad_token_id, "input_embeddings": source, "prlhf_version": __version__}
    (folder / "export.json").write_text(json.dumps(meta, indent=1) + "\n")


def input_embedding_source(model: nn.Module, folder: Path) -> dict:
    """Where the model's (V, d) input embedding matrix is stored under `folder`, for PromptEmbedder to read it
    alone: {"file", "tensor", "scale"}. Found by name in the saved model/ files and checked to be equal; if saving
    renamed it (some architectures convert names), it gets a file of its own."""
    module = model.get_input_embeddings()
    weight = module.weight.detach().cpu()
    scale = embedding_scale(module)
    name = next(n for n, p in model.named_parameters() if p is module.weight)
    for path in sorted((folder / "model").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if name in f.keys() and torch.equal(f.get_tensor(name), weight):
                return {"file": f"model/{path.name}", "tensor": name, "scale": scale}
    save_file({"weight": weight.contiguous()}, str(folder / "input_embeddings.safetensors"))
    return {"file": "input_embeddings.safetensors", "tensor": "weight", "scale": scale}


def embedding_scale(module: nn.Module) -> float | None:
    """What the input embedding layer multiplies its rows by on lookup (Gemma 3's embed_scale, sqrt(d)), or None
    for a plain lookup; refused (RunError) when the layer does anything else, which PromptEmbedder cannot rebuild."""
    if type(module).forward is nn.Embedding.forward:
        return None
    scale = getattr(module, "embed_scale", None)
    scale = None if scale is None else float(scale)
    weight = getattr(module, "weight", None)
    ok = isinstance(weight, torch.Tensor) and weight.dim() == 2
    if ok:
        ids = torch.arange(min(weight.shape[0], 256), device=weight.device)
        with torch.no_grad():
            expected = F.embedding(ids, weight)
            if scale is not None:
                expected = expected * torch.tensor(scale, dtype=weight.dtype, device=weight.device)
            ok = torch.equal(module(ids), expected)
    if not ok:
        raise RunError(f"the model's input embedding layer ({type(module).__name__}) is not a (scaled) lookup of "
                       "its weight, so export cannot rebuild its embeddings")
    return scale


def write_user_table(path: Path, user_model: UserModel, chunk_rows: int | None = None) -> None:
    """Write safetensors `embeddings` (N+1, T_u, d) = user_model(0..N), streamed: computed and written
    `chunk_rows` users at a time (default: CHUNK_BYTES' worth), so memory stays at one chunk for any N."""
    n, t, d = user_model.num_users + 1, user_model.num_tokens, user_model.hidden_size
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // max(1, 4 * t * d))
    if sys.byteorder != "little":  # safetensors stores little-endian; torch writes native bytes
        raise RunError("export: the user table can be written on a little-endian machine only")
    with torch.no_grad(), open(path, "xb") as f:
        first = _user_rows(user_model, 0, min(n, chunk_rows))  # its dtype goes into the header
        nbytes = n * t * d * first.element_size()
        header = {USERS_TENSOR: {"dtype": _SAFETENSORS_DTYPES[first.dtype], "shape": [n, t, d],
                                 "data_offsets": [0, nbytes]},
                  "__metadata__": {"format": "prlhf-users/1", "generic_index": "0"}}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # padded like safetensors' own writer, so the data starts aligned
        f.write(struct.pack("<Q", len(text)) + text)
        chunk = first
        for start in range(0, n, chunk_rows):
            if start:
                chunk = _user_rows(user_model, start, min(n, start + chunk_rows))
            f.write(chunk.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        if f.tell() != 8 + len(text) + nbytes:
            raise RunError(f"export: {path.name} came out at {f.tell()} bytes, not {8 + len(text) + nbytes}")


def _user_rows(user_model: UserModel, start: int, stop: int) -> torch.Tensor:
    """(stop - start, T_u, d) soft tokens of users start..stop-1 (index 0 = the generic user), on the CPU."""
    return user_model(torch.arange(start, stop)).detach().cpu()
