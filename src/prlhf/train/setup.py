"""Everything a run needs before its first step: the base LM and tokenizer, token ids, user model, optimizer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prlhf.config import TrainConfig
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import EncodedPair, encode_records
from prlhf.model.loading import ensure_pad_token, load_base
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.tiny import build_tiny_model, build_tiny_tokenizer
from prlhf.train.optim import RowSparseAdamW
from prlhf.train.sft import supervised_warmup

logger = logging.getLogger(__name__)


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
    return encode_records(records, tokenizer, config.max_length, config.max_prompt_length, config.use_user_text)


def prepare_base(
    config: TrainConfig, records: Sequence[PreferenceRecord], run_dir: Path, is_main: bool,
    show_progress: bool, device: torch.device | str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list[EncodedPair]]:
    """The base LM (= the reference policy) and the encoded training pairs.

    The tiny model is built from the data and warmed up; a warmed-up base is saved to RUN_DIR/base, so the
    reference is the same after --resume and at evaluation.
    """
    saved = run_dir / "base"
    if (saved / "config.json").is_file():
        base, tokenizer = load_base(saved)
        return base, tokenizer, encode(config, records, tokenizer)
    if config.is_tiny:
        tokenizer = build_tiny_tokenizer(record_texts(records))
        base = build_tiny_model(tokenizer, seed=config.seed)
    else:
        base, tokenizer = load_base(config.model)
    ensure_pad_token(tokenizer, base)
    pairs = encode(config, records, tokenizer)
    steps = config.resolved_sft_steps()
    base.to(device)
    if steps:
        nll = supervised_warmup(base, pairs, tokenizer.pad_token_id, steps, batch_size=config.batch_size,
                                seed=config.seed, show_progress=show_progress)
        logger.info("supervised warm-up: %d steps, final token NLL %.3f", steps, nll)
    if (config.is_tiny or steps) and is_main:
        base.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
    return base, tokenizer, pairs


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
