"""Batched no-grad passes over encoded pairs: reference log-probs, implicit-reward margins, reward scores; and
per-user accuracy from the margins (P-RLHF.md §4).

The implicit reward margin of a pair for user u is h(e_u) / beta = [log pi(y_w|x,e_u) - log pi_ref(y_w|x)]
- [log pi(y_l|x,e_u) - log pi_ref(y_l|x)]; a pair counts as correct when it is > 0. Users the registry does not
know are unseen and scored with the generic embedding e_0. For a reward model the margin is
r(x, y_w, e_u) - r(x, y_l, e_u).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Container, Sequence

import torch
from tqdm.auto import tqdm

from prlhf.data.collate import PairBatch, PairCollator, UserIndex, length_sorted_batches
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import EncodedPair
from prlhf.model.personalized import PersonalizedLM
from prlhf.progress import bar_disabled


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int,
                score: Callable[[PairBatch], torch.Tensor], columns: int, registry: UserIndex | None = None,
                batch_size: int = 32, desc: str = "scoring", show_progress: bool = False) -> torch.Tensor:
    """The one batched pass: (N, columns) float32 in dataset order, where `score(batch)` gives (columns * B,)
    values, column after column (chosen rows then rejected rows for columns=2). Pairs of similar length share
    a batch; without a registry every pair gets the generic index 0. The model is in eval mode meanwhile."""
    collate = PairCollator(pairs, registry, pad_id)
    device = model.lm.get_input_embeddings().weight.device
    out = torch.zeros(len(pairs), columns)
    was_training = model.training
    model.eval()
    try:
        for indices in tqdm(length_sorted_batches(pairs, batch_size), desc=desc, disable=bar_disabled(show_progress),
                            leave=False):
            batch = collate(indices).to(device)
            values = score(batch).float().cpu().view(columns, len(batch))  # (columns, B)
            out[batch.example_idx.cpu()] = values.T
    finally:
        model.train(was_training)
    return out


def compute_reference_logps(model: PersonalizedLM, pairs: Sequence[EncodedPair], pad_id: int,
                            batch_size: int = 32, show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference log-probs log pi_ref(y|x), each (N,) float32 in dataset order."""
    logps = score_pairs(model, pairs, pad_id, lambda b: model.reference_logps(b.input_ids, b.attention_mask,
                                                                              b.labels),
                        columns=2, batch_size=batch_size, desc="reference log-probs", show_progress=show_progress)
    return logps[:, 0].contiguous(), logps[:, 1].contiguous()


def implicit_reward_margins(model: PersonalizedLM, pairs: Sequence[EncodedPair], registry: UserIndex,
                            pad_id: int, batch_size: int = 32, show_progress: bool = False,
                            reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(N,) margins h/beta in dataset order, each pair under its own user's embedding. `reference` = the
    pairs' (chosen, rejected) reference log-probs when already known (computed here otherwise).
    For a reward model (P-RM) the margin is r(x, y_w, e_u) - r(x, y_l, e_u): no reference."""
    if getattr(model, "is_reward_model", False):
        ref_chosen = ref_rejected = torch.zeros(len(pairs))
    else:
        ref_chosen, ref_rejected = reference or compute_reference_logps(model, pairs, pad_id, batch_size,
                                                                        show_progress)
    with_users = model.num_user_tokens > 0

    def policy(batch: PairBatch) -> torch.Tensor:
        users = batch.user_idx.repeat(2) if with_users else None  # (2B,): chosen rows, then rejected rows
        return model(batch.input_ids, batch.attention_mask, batch.labels, users)

    logps = score_pairs(model, pairs, pad_id, policy, columns=2, registry=registry, batch_size=batch_size,
                        desc="policy log-probs", show_progress=show_progress)
    return (logps[:, 0] - ref_chosen) - (logps[:, 1] - ref_rejected)


def reward_scores(model: torch.nn.Module, pairs: Sequence[EncodedPair], registry: UserIndex, pad_id: int,
                  batch_size: int = 32) -> torch.Tensor:
    """(N,) r(x, y_w, e_u) of each pair's "chosen" response under its user (a reward model)."""

    def reward(batch: PairBatch) -> torch.Tensor:
        n = len(batch)  # rows [0, n) hold prompt + chosen response; the rejected rows are not scored
        return model(batch.input_ids[:n], batch.attention_mask[:n], batch.labels[:n], batch.user_idx)

    return score_pairs(model, pairs, pad_id, reward, columns=1, registry=registry, batch_size=batch_size)[:, 0]


def per_user_accuracy(records: Sequence[PreferenceRecord], margins: torch.Tensor,
                      registry: Container[str]) -> dict:
    """The eval JSON: pooled accuracy, mean and worst over seen users, unseen pooled, and each user's figures.
    `registry` only answers whether a user was seen (a set of ids does too)."""
    correct, total = defaultdict(int), defaultdict(int)
    for rec, m in zip(records, margins.tolist()):
        correct[rec.user_id] += m > 0
        total[rec.user_id] += 1
    per_user = {u: {"accuracy": correct[u] / total[u], "n": total[u], "seen": u in registry} for u in sorted(total)}
    seen = [v["accuracy"] for v in per_user.values() if v["seen"]]
    unseen = [u for u, v in per_user.items() if not v["seen"]]
    return {
        "accuracy": sum(correct.values()) / max(1, len(records)),
        "mean_user_accuracy": sum(seen) / len(seen) if seen else None,
        "worst_user_accuracy": min(seen) if seen else None,
        "unseen_accuracy": sum(correct[u] for u in unseen) / sum(total[u] for u in unseen) if unseen else None,
        "n_pairs": len(records),
        "per_user": per_user,
    }
