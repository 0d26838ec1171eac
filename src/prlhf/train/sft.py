"""Short supervised warm-up of a base LM on the responses, for a random-init model that cannot yet write."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from prlhf.data.tokenize import EncodedPair
from prlhf.model.logprobs import IGNORE_INDEX, sequence_logps
from prlhf.train.batching import EpochBatchSampler, PairCollator


def supervised_warmup(model: PreTrainedModel, pairs: Sequence[EncodedPair], pad_id: int, steps: int,
                      batch_size: int = 16, lr: float = 3e-3, seed: int = 0, show_progress: bool = True) -> float:
    """Full fine-tuning on prompt -> response (chosen and rejected alike, so no preference leaks into the
    reference). Returns the last step's mean token NLL."""
    device = model.get_input_embeddings().weight.device
    collate = PairCollator(pairs, None, pad_id)
    sampler = EpochBatchSampler(len(pairs), batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(1, steps))
    model.train()
    step, epoch, nll = 0, 0, float("nan")
    bar = tqdm(total=steps, desc="warm-up (SFT)", disable=not show_progress, leave=False)
    while step < steps:
        sampler.set_epoch(epoch)
        for indices in sampler:
            batch = collate(indices).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            n_tokens = (batch.labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
            loss = -sequence_logps(logits, batch.labels).sum() / n_tokens
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, nll = step + 1, loss.item()
            bar.update()
            bar.set_postfix(nll=f"{nll:.3f}")
            if step >= steps:
                break
        epoch += 1
    bar.close()
    model.eval()
    return nll
