"""Reference log-probs for training: computed once before it (the reference never changes), and cached on disk
between runs with the same base, tokens and precision."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from prlhf.data.tokenize import EncodedPair
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.scoring import compute_reference_logps
from prlhf.safe_io import atomic_write_bytes

logger = logging.getLogger(__name__)


def reference_cache_dir(setting: str) -> Path | None:
    """'auto' = $PRLHF_CACHE_DIR/reference_logps (default ~/.cache/prlhf/...), 'none' = off, else a folder."""
    if setting == "none":
        return None
    if setting == "auto":
        return Path(os.environ.get("PRLHF_CACHE_DIR") or Path.home() / ".cache" / "prlhf") / "reference_logps"
    return Path(setting)


def reference_cache_key(model: PersonalizedLM, pairs: Sequence[EncodedPair], precision: str) -> str:
    """sha256 over what the reference log-probs depend on: the base weights (adapters and user model excluded),
    the token ids of every pair (so the tokenizer, the data, truncation and user_text all count) and the
    precision they are computed in."""
    h = hashlib.sha256()
    base = model.lm.get_base_model() if isinstance(model.lm, PeftModel) else model.lm
    h.update(f"v1|{precision}|{type(base).__name__}".encode())
    for name, tensor in sorted(base.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for p in pairs:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()[:32]


def cached_reference_logps(model: PersonalizedLM, pairs: Sequence[EncodedPair], pad_id: int,
                           cache_dir: Path | None, precision: str = "no", write: bool = True,
                           show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """compute_reference_logps, reused from `cache_dir` when the same model, tokens and precision were seen
    before. `cache_dir=None` turns the cache off; only `write=True` callers (the main process) write it."""
    if cache_dir is None:
        return compute_reference_logps(model, pairs, pad_id, show_progress=show_progress)
    path = Path(cache_dir) / f"{reference_cache_key(model, pairs, precision)}.safetensors"
    if path.is_file():
        cached = _read_cache(path, len(pairs))
        if cached is not None:
            logger.info("reference log-probs: reusing %s", path)
            return cached
    chosen, rejected = compute_reference_logps(model, pairs, pad_id, show_progress=show_progress)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}))
    return chosen, rejected


def _read_cache(path: Path, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (chosen, rejected) log-probs, or None (and a warning) when the file is unreadable or the wrong
    size: a cache is only a shortcut, so a damaged one is computed again and replaced, never trusted."""
    try:
        cached = load_file(str(path))
        chosen, rejected = cached["chosen"], cached["rejected"]
    except (SafetensorError, OSError, KeyError) as exc:
        logger.warning("reference log-probs: ignoring the unreadable cache %s (%s)", path, exc)
        return None
    if chosen.shape != (n_pairs,) or rejected.shape != (n_pairs,):
        logger.warning("reference log-probs: ignoring the cache %s: %s log-probs for %d pairs", path,
                       tuple(chosen.shape), n_pairs)
        return None
    return chosen, rejected
