"""Everything a run needs before its first step: the base LM and tokenizer, token ids, user model, optimizer."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prlhf.config import TrainConfig
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import EncodedPair, encode_as_configured
from prlhf.model.loading import check_lora_targets, ensure_pad_token, load_base
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.tiny import build_tiny_model, build_tiny_tokenizer
from prlhf.runs.directory import RunError
from prlhf.safe_io import (MANIFEST, fault_point, fsync_path, make_temp_dir, manifest_problem, remove_path, rename,
                           write_manifest)
from prlhf.train.checkpoint import rng_state, set_rng_state
from prlhf.train.optim import RowSparseAdamW
from prlhf.train.run_start import base_fingerprint, train_fingerprint
from prlhf.train.sft import split_by_prompt, supervised_warmup

logger = logging.getLogger(__name__)
BASE_RNG_FILE = "rng_state.bin"  # the main process's RNG right after the warm-up


def record_texts(records: Sequence[PreferenceRecord]) -> list[str]:
    """Every piece of text in the data (message contents for conversations): what the tiny tokenizer learns."""
    texts = []
    for rec in records:
        for value in (rec.prompt, rec.chosen, rec.rejected, rec.user_text):
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(m["content"] for m in value)
    return texts


def encode(config: TrainConfig, records, tokenizer) -> list[EncodedPair]:
    return encode_as_configured(records, tokenizer, config)


def prepare_base(
    config: TrainConfig, records: Sequence[PreferenceRecord], run_dir: Path, is_main: bool,
    show_progress: bool, device: torch.device | str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[EncodedPair]]:
    """The base LM (= the reference policy) and the encoded training pairs.

    The tiny model is built from the data and warmed up; a warmed-up base is saved to RUN_DIR/base, so the
    reference is the same after --resume and at evaluation. A saved base is reused only when it is complete and
    was built from the same data and options; the main process then also gets back the RNG state it had right
    after the warm-up, so a run restarted before its first checkpoint draws what an uninterrupted one draws
    (the warm-up of a model with dropout consumes the global RNG that LoRA's init and dropout use next).
    """
    saved = run_dir / "base"
    wanted = base_fingerprint(train_fingerprint(config, records))
    if reusable_base(saved, wanted):
        base, tokenizer = load_base(saved)
        if is_main:
            set_rng_state(torch.load(saved / BASE_RNG_FILE, weights_only=True))
        return base, tokenizer, encode(config, records, tokenizer)
    if config.is_tiny:
        tokenizer = build_tiny_tokenizer(record_texts(records))
        base = build_tiny_model(tokenizer, seed=config.seed)
    else:
        base, tokenizer = load_base(config.model)
    ensure_pad_token(tokenizer, base)
    check_lora_targets(base, config.lora_target_modules())  # before the warm-up: a typo costs seconds
    pairs = encode(config, records, tokenizer)
    steps = config.resolved_sft_steps()
    base.to(device)
    if steps:
        warm_pairs, holdout = split_by_prompt(pairs, config.sft_holdout, config.seed)
        result = supervised_warmup(base, warm_pairs, tokenizer.pad_token_id, steps, batch_size=config.batch_size,
                                   seed=config.seed, show_progress=show_progress, holdout=holdout)
        held_out = "" if result.holdout_nll is None else f", held-out {result.holdout_nll:.3f} (best of {steps})"
        logger.info("supervised warm-up: %d steps, token NLL %.3f%s", result.steps, result.train_nll, held_out)
    if (config.is_tiny or steps) and is_main:
        save_base(base, tokenizer, saved, wanted)
    return base, tokenizer, pairs


def reusable_base(saved: Path, fingerprint: dict) -> bool:
    """A base/ written whole by save_base from the same data and options (one written before base/ had a manifest
    cannot be told apart from a half-written one: it is built again)."""
    if not (saved / MANIFEST).is_file():
        return False
    try:
        same = json.loads((saved / MANIFEST).read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False
    if not same:
        logger.info("%s was built from other data or options: building the base again", saved)
    return same and manifest_problem(saved) is None


def save_base(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saved: Path, fingerprint: dict) -> None:
    """Write base/ in a temporary folder beside it (with the RNG state of this moment and a manifest holding
    `fingerprint`), then rename it into place: a kill or a full disk leaves no partial base/."""
    tmp = make_temp_dir(saved.parent, "base")
    try:
        fault_point("base", "write model")
        base.save_pretrained(tmp)
        fault_point("base", "write tokenizer")
        tokenizer.save_pretrained(tmp)
        fault_point("base", f"write {BASE_RNG_FILE}")
        torch.save(rng_state(), tmp / BASE_RNG_FILE)
        write_manifest(tmp, "base", fingerprint=fingerprint)
        remove_path(saved, "base")  # a stale one (other data or options): no checkpoint uses it (run_start)
        rename(tmp, saved, "base")
        fsync_path(saved.parent)
    except BaseException as exc:
        remove_path(tmp, "cleanup")
        if isinstance(exc, OSError):  # a full disk, say: one line, and nothing half-written stays
            raise RunError(f"{saved}: could not write the warmed-up base ({exc.strerror or exc}); nothing of it was "
                           "kept: free space and run the command again") from exc
        raise


def build_optimizer(model: PersonalizedLM, config: TrainConfig) -> torch.optim.Optimizer:
    """Adapters at lr; the user model at its own (higher) rate, and its O(1) per-user codes (cluster logits,
    low-rank vectors) at `user_code_lr`. Only the per-user tables (sparse: each row is updated, and decayed, only
    when its user is in the batch) take `user_weight_decay`; decay on e_0, the prototypes or the shared
    up-projection would shrink every user's tokens at once."""
    lm_params = [p for p in model.lm.parameters() if p.requires_grad]
    if hasattr(model, "value_head"):  # a reward model's head learns with the adapters
        lm_params += list(model.value_head.parameters())
    tables = [m.weight for m in model.user_model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    shared = [p for p in model.user_model.parameters() if p.requires_grad and all(p is not t for t in tables)]
    groups = [{"params": lm_params, "lr": config.resolved_lr(), "weight_decay": config.weight_decay}]
    codes = {id(p) for p in model.user_model.code_parameters()}
    user_lr, code_lr = config.resolved_user_lr(), config.resolved_user_code_lr()
    for params, lr, decay in (([t for t in tables if id(t) not in codes], user_lr, config.user_weight_decay),
                              ([t for t in tables if id(t) in codes], code_lr, config.user_weight_decay),
                              (shared, user_lr, 0.0)):
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": decay})
    return RowSparseAdamW(groups)
