"""The personalized reward model (P-RM, P-RLHF.md §4): r(x, y, e_u) = a scalar head on the backbone's last hidden
state, with the user's soft tokens in `inputs_embeds` exactly as in the personalized LM.

    tokens:  [BOS] [u_1 ... u_T] [prompt ...] [response ...] [pad ...]
    reward:                                         head(h at the last real token)      pool "last"
                                                    head(mean of h over the response)   pool "mean"
"""

from __future__ import annotations

import torch
from torch import nn

from prlhf.data.collate import IGNORE_INDEX
from prlhf.model.soft_prompt import SoftPromptModel
from prlhf.users.models import UserModel

VALUE_HEAD_FILE = "value_head.safetensors"


class PersonalizedRewardModel(SoftPromptModel):
    """The personalized LM's backbone and soft-token insertion; `forward` returns rewards (S,) instead of log-probs.

    It keeps `PersonalizedLM`'s call signature (labels are read by pool "mean" only) so the training loop,
    evaluation and batching serve both objectives unchanged. It has no reference policy and does not generate.
    """

    is_reward_model = True

    def __init__(self, lm, user_model: UserModel, prefix_len: int, hidden_size: int, pool: str = "last"):
        super().__init__(lm, user_model, prefix_len)
        if pool not in ("last", "mean"):
            raise ValueError(f"reward pool must be last or mean, not {pool!r}")
        self.pool = pool
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1))  # small: rewards start near 0
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                user_idx: torch.Tensor | None = None, layout: object = None) -> torch.Tensor:
        """Rewards (S,) of right-padded sequences (S, L), each under its user's tokens (user_idx (S,)).
        Pool "mean" needs `labels` (S, L): the response tokens are those not IGNORE_INDEX. `layout` is accepted
        for the training loop's sake and unused: each sequence needs its own final hidden state, nothing is
        shared."""
        if self.pool == "mean" and labels is None:
            raise ValueError("a mean-pooled reward model needs labels to find the response tokens")
        embeds, mask, labels = self.insert_user_tokens(input_ids, attention_mask, labels, user_idx)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        # the LM head's logits are not needed: ask for one position only where the model allows it
        extra = {"logits_to_keep": 1} if self.supports_logits_to_keep() else {}
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False,
                      output_hidden_states=True, **extra)
        hidden = out.hidden_states[-1]  # (S, L + T_u, d), after the final norm
        if self.pool == "mean":
            weights = (labels != IGNORE_INDEX).to(hidden.dtype)  # (S, L + T_u)
            h = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)  # (S, d)
        else:
            last = mask.sum(-1) - 1  # (S,) right padding: the last real token
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (S, d)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()
