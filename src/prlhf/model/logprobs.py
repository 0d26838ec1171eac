"""Sequence log-probabilities from logits, with the one-token shift and label masking made explicit."""

from __future__ import annotations

import torch

from prlhf.data.collate import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of log p(label_t | tokens < t) over unmasked positions.

    logits: (B, L, V) where logits[:, t] predicts token t + 1; labels: (B, L) with `ignore_index` on prompt,
    user tokens and padding. Returns (B,) float32.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits (B, L, V) and labels (B, L), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    targets = labels[:, 1:]                        # (B, L-1)
    mask = targets != ignore_index
    logits = logits[:, :-1].float()                # (B, L-1, V)
    safe_targets = targets.masked_fill(~mask, 0)
    # log_softmax then gather, without materialising a second (B, L, V) tensor for the gathered values
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe_targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)            # (B,)
