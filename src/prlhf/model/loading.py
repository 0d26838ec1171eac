"""Loading a base causal LM and its tokenizer, and wrapping it with LoRA adapters (PEFT)."""

from __future__ import annotations

import logging
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prlhf.model.presets import resolve_model

logger = logging.getLogger(__name__)

# PEFT's "all-linear" targets every linear layer but the output head: attention and MLP projections on any
# architecture, which is what the authors adapted (r=8, alpha=16, dropout=0.05).
DEFAULT_LORA_TARGETS = "all-linear"


def load_base(name_or_path: str | os.PathLike, dtype: torch.dtype | None = None,
              **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any Hugging Face causal LM (hub id, local folder or a preset name such as `smollm2-135m`) and its
    tokenizer, with a pad token guaranteed."""
    name_or_path = resolve_model(str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


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


def add_lora(model: PreTrainedModel, r: int = 8, alpha: int = 16, dropout: float = 0.05,
             target_modules: str | list[str] = DEFAULT_LORA_TARGETS) -> PeftModel:
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


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
