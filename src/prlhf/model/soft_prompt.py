"""What the personalized LM and the personalized reward model share: a backbone LM, a user model, and the users'
soft tokens placed in `inputs_embeds` right after the prefix (BOS), P-RLHF.md §3.

    tokens:    [BOS] [u_1 ... u_T] [prompt ...] [response ...] [pad ...]
"""

from __future__ import annotations

import inspect

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from prlhf.data.collate import IGNORE_INDEX
from prlhf.users.models import UserModel


class SoftPromptModel(nn.Module):
    def __init__(self, lm: PreTrainedModel | PeftModel, user_model: UserModel, prefix_len: int):
        super().__init__()
        self.lm = lm
        self.user_model = user_model
        self.prefix_len = prefix_len  # 1 when sequences start with BOS (user tokens go after it), else 0
        self._supports_logits_to_keep: bool | None = None
        self._cache_kwarg: str | None = None

    @property
    def num_user_tokens(self) -> int:
        return self.user_model.num_tokens

    def insert_user_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                           user_idx: torch.Tensor | None, user_model: UserModel | None = None):
        """(S, L) ids -> (S, L + T_u, d) embeddings with the users' soft tokens after the prefix. `user_model`
        replaces the model's own (the server passes the user table version a batch started with)."""
        embeds = self.lm.get_input_embeddings()(input_ids)  # (S, L, d)
        user_model = self.user_model if user_model is None else user_model
        if user_idx is None or user_model.num_tokens == 0:
            return embeds, attention_mask, labels
        soft = user_model(user_idx).to(embeds.dtype)  # (S, T_u, d)
        s, t, b = input_ids.shape[0], soft.shape[1], self.prefix_len
        embeds = torch.cat([embeds[:, :b], soft, embeds[:, b:]], dim=1)
        ones = attention_mask.new_ones(s, t)
        attention_mask = torch.cat([attention_mask[:, :b], ones, attention_mask[:, b:]], dim=1)
        if labels is not None:
            labels = torch.cat([labels[:, :b], labels.new_full((s, t), IGNORE_INDEX), labels[:, b:]], dim=1)
        return embeds, attention_mask, labels

    def cache_kwarg(self) -> str:
        """The forward argument that takes a KV cache: `cache` in transformers 5, `past_key_values` before."""
        if self._cache_kwarg is None:
            self._cache_kwarg = "cache" if "cache" in self._base_forward_params() else "past_key_values"
        return self._cache_kwarg

    def _base_forward_params(self):
        """The parameter names of the underlying transformers model's forward (under any PEFT wrapper)."""
        base = self.lm.get_base_model() if isinstance(self.lm, PeftModel) else self.lm
        return inspect.signature(base.forward).parameters

    def supports_logits_to_keep(self) -> bool:
        if self._supports_logits_to_keep is None:
            self._supports_logits_to_keep = "logits_to_keep" in self._base_forward_params()
        return self._supports_logits_to_keep
