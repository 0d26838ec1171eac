"""Training metrics with the field's names, plus per-user summaries (never one key per user)."""

from __future__ import annotations

from collections import defaultdict

import torch

from prlhf.losses import PreferenceLossOutput


def batch_metrics(out: PreferenceLossOutput, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                  generic: PreferenceLossOutput | None) -> dict[str, float]:
    margins = out.chosen_rewards - out.rejected_rewards
    metrics = {
        "loss": out.losses.mean().item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
    }
    if generic is not None:
        metrics["generic/rewards/accuracies"] = (generic.chosen_rewards > generic.rejected_rewards).float().mean().item()
        metrics["generic/loss"] = generic.losses.mean().item()
    return metrics


class PerUserAccuracy:
    """Running per-user share of pairs with positive implicit-reward margin, summarised as mean and worst."""

    def __init__(self):
        self.correct: dict[int, float] = defaultdict(float)
        self.total: dict[int, int] = defaultdict(int)

    def update(self, user_idx: torch.Tensor, margins: torch.Tensor) -> None:
        for u, ok in zip(user_idx.tolist(), (margins > 0).tolist()):
            self.correct[u] += ok
            self.total[u] += 1

    def summary(self, prefix: str = "users") -> dict[str, float]:
        if not self.total:
            return {}
        acc = [self.correct[u] / self.total[u] for u in self.total]
        return {f"{prefix}/mean_accuracy": sum(acc) / len(acc), f"{prefix}/worst_accuracy": min(acc),
                f"{prefix}/count": float(len(acc))}


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in sorted(keys)}
