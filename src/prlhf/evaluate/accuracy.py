"""Per-user implicit-reward accuracy on held-out pairs (P-RLHF.md §4); for a reward model, its reward's accuracy.

The implicit reward margin of a pair for user u is h(e_u) / beta = [log pi(y_w|x,e_u) - log pi_ref(y_w|x)]
- [log pi(y_l|x,e_u) - log pi_ref(y_l|x)]; a pair counts as correct when it is > 0. Users the registry does not
know are unseen and scored with the generic embedding e_0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Sequence

import torch
from tqdm.auto import tqdm

from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import EncodedPair
from prlhf.model.personalized import PersonalizedLM
from prlhf.progress import bar_disabled
from prlhf.train.batching import PairCollator, length_sorted_batches
from prlhf.train.reference import compute_reference_logps
from prlhf.users.registry import UserRegistry


@torch.no_grad()
def implicit_reward_margins(model: PersonalizedLM, pairs: Sequence[EncodedPair], registry: UserRegistry,
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
    collate = PairCollator(pairs, registry, pad_id)
    device = model.lm.get_input_embeddings().weight.device
    with_users = model.num_user_tokens > 0
    policy_chosen, policy_rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    was_training = model.training
    model.eval()
    for indices in tqdm(length_sorted_batches(pairs, batch_size), desc="policy log-probs",
                        disable=bar_disabled(show_progress), leave=False):
        batch = collate(indices).to(device)
        users = batch.user_idx.repeat(2) if with_users else None  # (2B,): chosen rows, then rejected rows
        logps = model(batch.input_ids, batch.attention_mask, batch.labels, users).float().cpu()
        idx = batch.example_idx.cpu()
        policy_chosen[idx], policy_rejected[idx] = logps.chunk(2)
    model.train(was_training)
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def per_user_accuracy(records: Sequence[PreferenceRecord], margins: torch.Tensor,
                      registry: UserRegistry | Container[str]) -> dict:
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
