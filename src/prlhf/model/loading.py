"""Loading a base causal LM and its tokenizer, and wrapping it with LoRA adapters (PEFT)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from prlhf.config import ConfigError, short_repr
from prlhf.model.presets import resolve_model

logger = logging.getLogger(__name__)

# PEFT's "all-linear" targets every linear layer but the output head: attention and MLP projections on any
# architecture, which is what the authors adapted (r=8, alpha=16, dropout=0.05).
DEFAULT_LORA_TARGETS = "all-linear"
# The layers PEFT's LoRA wraps (its default dispatch; quantized layers aside)
LORA_LAYER_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D, nn.MultiheadAttention)


def load_base(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
              **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any Hugging Face causal LM (hub id, local folder or a preset name such as `smollm2-135m`) and its
    tokenizer, with a pad token guaranteed."""
    name_or_path = resolve_model(str(name_or_path))
    if looks_like_path(name_or_path) and not Path(name_or_path).is_dir():
        raise ConfigError(f"{name_or_path}: model folder not found (a model is 'tiny', a preset, a hub id such as "
                          "HuggingFaceTB/SmolLM2-135M, or a local folder)")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def looks_like_path(name: str) -> bool:
    """A local path, not a hub id (`namespace/name`: one slash at most, never absolute or relative)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    # Padding positions are always masked out, so reusing EOS as pad (GPT-2 style) is harmless.
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; cannot batch sequences")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses need one to end")
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def input_embeddings_as_seen(model: PreTrainedModel) -> torch.Tensor:
    """(V, d) the vocabulary embeddings as the model's first layer receives them: what soft tokens start from
    and sit beside. Gemma 3's embedding module multiplies each row by sqrt(d) on lookup (Gemma-3-270M: weight rows
    of norm 1.0 reach the layers with norm 26), so copies of `.weight` would start 25x smaller than the words
    around them. A plain nn.Embedding returns its rows as they are: its weight, no copy."""
    embedding = model.get_input_embeddings()
    if type(embedding).forward is nn.Embedding.forward:
        return embedding.weight
    with torch.no_grad():
        return embedding(torch.arange(embedding.weight.shape[0], device=embedding.weight.device))


def add_lora(model: PreTrainedModel, r: int = 8, alpha: int = 16, dropout: float = 0.05,
             target_modules: str | list[str] = DEFAULT_LORA_TARGETS) -> PeftModel:
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_lora_targets(model: nn.Module, target_modules: str | list[str]) -> None:
    """A one-line ConfigError unless `target_modules` picks layers of `model` that LoRA can wrap, matched as PEFT
    matches them. Checked before the warm-up, so a typo costs seconds, not a warm-up and a blocked --out."""
    if target_modules == "all-linear":
        return
    config = LoraConfig(target_modules=target_modules)
    matched = [(name, m) for name, m in model.named_modules() if name and check_target_module_exists(config, name)]
    layers = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LORA_LAYER_TYPES)})
    hint = f"layers LoRA can adapt: {', '.join(layers)}, or all-linear"
    if not matched:
        raise ConfigError(f"train: lora_targets {short_repr(target_modules)} matches no module of the model "
                          f"({hint})")
    for name, module in matched:
        if not isinstance(module, LORA_LAYER_TYPES):
            raise ConfigError(f"train: lora_targets: module {name!r} is a {type(module).__name__}, which LoRA "
                              f"cannot wrap ({hint})")


def disable_dropout(model: torch.nn.Module) -> int:
    """Zero every dropout of the model in place; returns how many were on.

    DPO compares the policy's log-probs with the reference's, which are computed without dropout: with dropout on
    in training, the two differ before any update and the implicit rewards start as noise (TRL's `DPOConfig`
    disables dropout by default for this reason). Architectures drop either through `nn.Dropout` modules (GPT-2)
    or through a float attribute their layers read at forward time (`attention_dropout` in Llama, Qwen2;
    `hidden_dropout` in BLOOM): both are zeroed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer in the backward pass. Non-reentrant, so inputs given as `inputs_embeds` (the user
    tokens) need no requires_grad set by hand. transformers 5 renamed the method; 4.x has the old name only."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
