"""Short supervised warm-up of a base LM on the responses, for a random-init model that cannot yet write.

The warm-up can stop early on held-out responses: it fine-tunes on the responses of most training prompts and
stops when the token NLL on the responses of the others stops improving, keeping the best weights. A warm-up
run past that point learns the training texts by heart, and what DPO then learns on top of such a reference
transfers less to new content.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from prlhf.data.collate import IGNORE_INDEX, PairCollator, length_sorted_batches
from prlhf.data.tokenize import EncodedPair
from prlhf.model.logprobs import sequence_logps
from prlhf.progress import bar_disabled
from prlhf.train.batching import EpochBatchSampler


@dataclass(frozen=True)
class WarmupResult:
    steps: int               # steps whose weights were kept (the best held-out point when stopping early)
    train_nll: float         # mean token NLL of the last training batch
    holdout_nll: float | None  # best held-out token NLL (None without a held-out set)


def split_by_prompt(pairs: Sequence[EncodedPair], fraction: float, seed: int
                    ) -> tuple[list[EncodedPair], list[EncodedPair]]:
    """(train, held-out) with about `fraction` of the distinct prompts held out; a prompt's pairs stay together.

    Fewer than 2 distinct prompts (or fraction 0) hold nothing out."""
    prompts = sorted({tuple(p.prompt_ids) for p in pairs})
    n_out = round(fraction * len(prompts))
    if n_out == 0 or len(prompts) < 2:
        return list(pairs), []
    held = set(random.Random(seed).sample(prompts, min(n_out, len(prompts) - 1)))
    return ([p for p in pairs if tuple(p.prompt_ids) not in held], [p for p in pairs if tuple(p.prompt_ids) in held])


def _token_nll(model: PreTrainedModel, batch) -> torch.Tensor:
    """Mean NLL per response token of a collated batch (chosen and rejected rows alike)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    n_tokens = (batch.labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    return -sequence_logps(logits, batch.labels).sum() / n_tokens


@torch.no_grad()
def holdout_nll(model: PreTrainedModel, pairs: Sequence[EncodedPair], pad_id: int, batch_size: int) -> float:
    collate = PairCollator(pairs, None, pad_id)
    device = model.get_input_embeddings().weight.device
    total, tokens, was_training = 0.0, 0, model.training
    model.eval()
    for indices in length_sorted_batches(pairs, batch_size):
        batch = collate(indices).to(device)
        n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        total, tokens = total + float(_token_nll(model, batch)) * n, tokens + n
    model.train(was_training)
    return total / max(1, tokens)


def supervised_warmup(model: PreTrainedModel, pairs: Sequence[EncodedPair], pad_id: int, steps: int,
                      batch_size: int = 16, lr: float = 3e-3, seed: int = 0, show_progress: bool = True,
                      holdout: Sequence[EncodedPair] = (), eval_every: int = 25, patience: int = 2) -> WarmupResult:
    """Full fine-tuning on prompt -> response (chosen and rejected alike, so no preference leaks into the
    reference), for at most `steps` steps.

    With `holdout` pairs, the held-out token NLL is measured every `eval_every` steps; the warm-up stops after
    `patience` measurements without a new best, and the model is left at its best measured weights.
    """
    device = model.get_input_embeddings().weight.device
    collate = PairCollator(pairs, None, pad_id)
    sampler = EpochBatchSampler(len(pairs), batch_size, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(1, steps))
    model.train()
    step, epoch, nll = 0, 0, float("nan")
    best = (float("inf"), 0, None)  # (held-out NLL, step, weights)
    stale = 0
    bar = tqdm(total=steps, desc="warm-up (SFT)", disable=bar_disabled(show_progress), leave=False)
    while step < steps and stale < patience:
        sampler.set_epoch(epoch)
        for indices in sampler:
            loss = _token_nll(model, collate(indices).to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, nll = step + 1, loss.item()
            bar.update()
            bar.set_postfix(nll=f"{nll:.3f}")
            if holdout and (step % eval_every == 0 or step == steps):
                value = holdout_nll(model, holdout, pad_id, batch_size)
                if value < best[0]:
                    best, stale = (value, step, copy.deepcopy(model.state_dict())), 0
                else:
                    stale += 1
            if step >= steps or stale >= patience:
                break
        epoch += 1
    bar.close()
    if holdout and best[2] is not None:
        model.load_state_dict(best[2])
        result = WarmupResult(best[1], nll, best[0])
    else:
        result = WarmupResult(step, nll, None)
    model.eval()
    return result
