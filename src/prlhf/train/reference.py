"""Reference log-probs log pi_ref(y|x): computed once, before training (the reference never changes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from prlhf.data.tokenize import EncodedPair
from prlhf.model.personalized import PersonalizedLM
from prlhf.train.batching import PairCollator, length_sorted_batches


@torch.no_grad()
def compute_reference_logps(model: PersonalizedLM, pairs: Sequence[EncodedPair], pad_id: int,
                            batch_size: int = 32, show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (chosen, rejected) reference log-probs, each (N,) float32 in dataset order."""
    collate = PairCollator(pairs, None, pad_id)
    device = model.lm.get_input_embeddings().weight.device
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    was_training = model.training
    model.eval()
    for indices in tqdm(length_sorted_batches(pairs, batch_size), desc="reference log-probs",
                        disable=not show_progress, leave=False):
        batch = collate(indices).to(device)
        logps = model.reference_logps(batch.input_ids, batch.attention_mask, batch.labels).float().cpu()  # (2B,)
        chosen[batch.example_idx.cpu()], rejected[batch.example_idx.cpu()] = logps.chunk(2)
    model.train(was_training)
    return chosen, rejected
