"""DPO and P-DPO as pure functions of per-sequence log-probs (P-RLHF.md §4).

Each returns per-example losses and rewards (not means), so callers can weight, slice and group them by user.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLossOutput(NamedTuple):
    losses: torch.Tensor            # (B,) per-example loss
    chosen_rewards: torch.Tensor    # (B,) beta * (log pi(y_w) - log pi_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # (B,) beta * (log pi(y_l) - log pi_ref(y_l)), detached


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 1 for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of one shape (B,), got {shapes}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float) -> PreferenceLossOutput:
    """Vanilla DPO (Rafailov et al. 2023).

    h = beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))],  l = -log sigmoid(h).
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      reference_chosen_logps=reference_chosen_logps,
                      reference_rejected_logps=reference_rejected_logps)
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def p_dpo_loss(user_chosen_logps: torch.Tensor, user_rejected_logps: torch.Tensor,
               generic_chosen_logps: torch.Tensor | None, generic_rejected_logps: torch.Tensor | None,
               reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
               beta: float, alpha: float) -> tuple[PreferenceLossOutput, PreferenceLossOutput | None]:
    """P-DPO: every pair is used twice, with its user's embedding e_u and with the generic e_0.

    L = alpha * l(e_u) + (1 - alpha) * l(e_0), per example; the reference has no user tokens in both terms.
    Returns (combined, generic): `combined.losses` is the weighted loss to optimise and `combined` rewards are
    those under the user's embedding (what per-user accuracy is measured on); `generic` is the e_0 term's
    output, or None when alpha == 1 (then no generic log-probs are needed).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    user = dpo_loss(user_chosen_logps, user_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta)
    if alpha == 1.0:
        return user, None
    if generic_chosen_logps is None or generic_rejected_logps is None:
        raise ValueError("alpha < 1 needs the generic user's log-probs")
    generic = dpo_loss(generic_chosen_logps, generic_rejected_logps, reference_chosen_logps,
                       reference_rejected_logps, beta)
    combined = alpha * user.losses + (1.0 - alpha) * generic.losses
    return PreferenceLossOutput(combined, user.chosen_rewards, user.rejected_rewards), generic


def chosen_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen responses, (B,): the extra term of RPO
    (Pang et al. 2024; TRL's `rpo_alpha`), which keeps the policy able to write what users chose."""
    _check_same_shape(chosen_logps=chosen_logps, chosen_lengths=chosen_lengths.to(chosen_logps.dtype))
    return -chosen_logps / chosen_lengths.clamp(min=1).to(chosen_logps.dtype)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> PreferenceLossOutput:
    """Reward-model loss: l = -log sigmoid(r(x, y_w) - r(x, y_l)) per example (B,)."""
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return PreferenceLossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def p_rm_loss(user_chosen: torch.Tensor, user_rejected: torch.Tensor, generic_chosen: torch.Tensor | None,
              generic_rejected: torch.Tensor | None, alpha: float,
              ) -> tuple[PreferenceLossOutput, PreferenceLossOutput | None]:
    """P-RM: the Bradley-Terry loss with the same alpha split as P-DPO,
    L = alpha * l(r(x, y, e_u)) + (1 - alpha) * l(r(x, y, e_0)). Returns (combined, generic) like `p_dpo_loss`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    user = bradley_terry_loss(user_chosen, user_rejected)
    if alpha == 1.0:
        return user, None
    if generic_chosen is None or generic_rejected is None:
        raise ValueError("alpha < 1 needs the generic user's rewards")
    generic = bradley_terry_loss(generic_chosen, generic_rejected)
    combined = alpha * user.losses + (1.0 - alpha) * generic.losses
    return PreferenceLossOutput(combined, user.chosen_rewards, user.rejected_rewards), generic
