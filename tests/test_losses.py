"""DPO / P-DPO losses on inputs whose answers can be computed on paper."""

import math

import pytest
import torch

from prlhf.losses import chosen_nll, dpo_loss, p_dpo_loss

T = torch.tensor


def test_policy_equal_to_reference_gives_log2():
    """h = 0 for every pair, so l = -log sigmoid(0) = log 2 and both rewards are 0."""
    lp = T([-3.0, -7.5, -1.0])
    out = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.5)
    assert torch.allclose(out.losses, torch.full((3,), math.log(2)))
    assert torch.equal(out.chosen_rewards, torch.zeros(3)) and torch.equal(out.rejected_rewards, torch.zeros(3))


def test_dpo_hand_computed():
    """beta = 0.5; chosen: policy -2, ref -3 -> reward 0.5*(1) = 0.5; rejected: policy -5, ref -4 -> reward -0.5.
    h = 0.5 - (-0.5) = 1 -> loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326."""
    out = dpo_loss(T([-2.0]), T([-5.0]), T([-3.0]), T([-4.0]), beta=0.5)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.313262, abs=1e-6)


def test_dpo_returns_per_example_losses_and_gradients():
    pc = T([-2.0, -1.0], requires_grad=True)
    out = dpo_loss(pc, T([-5.0, -1.0]), T([-3.0, -1.0]), T([-4.0, -1.0]), beta=1.0)
    assert out.losses.shape == (2,)
    out.losses.sum().backward()
    # d/dpc of -log sigmoid(beta*(pc - ...)) = -beta * sigmoid(-h); h = 2 for the first pair, 0 for the second
    assert torch.allclose(pc.grad, T([-1 / (1 + math.exp(2)), -0.5]))


def test_p_dpo_is_alpha_mix_of_user_and_generic_terms():
    """User term h = 1 (loss log(1+e^-1)); generic term h = -1 (loss log(1+e^1)); alpha = 0.25."""
    ref_c, ref_r = T([-3.0]), T([-4.0])
    combined, generic = p_dpo_loss(T([-2.0]), T([-5.0]), T([-4.0]), T([-3.0]), ref_c, ref_r, beta=0.5, alpha=0.25)
    expected = 0.25 * math.log(1 + math.exp(-1)) + 0.75 * math.log(1 + math.exp(1))
    assert combined.losses.item() == pytest.approx(expected, abs=1e-6)
    assert generic.losses.item() == pytest.approx(math.log(1 + math.exp(1)), abs=1e-6)
    # rewards reported are the user's (what per-user accuracy is measured on)
    assert combined.chosen_rewards.item() == pytest.approx(0.5)


def test_alpha_zero_with_identical_user_and_generic_is_vanilla_dpo():
    """The uniform model gives every user e_0, so user and generic log-probs coincide: P-DPO == DPO exactly."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g) for _ in range(4))
    vanilla = dpo_loss(pc, pr, rc, rr, beta=0.1)
    for alpha in (0.0, 0.5, 1.0):
        combined, _ = p_dpo_loss(pc, pr, pc, pr, rc, rr, beta=0.1, alpha=alpha)
        assert torch.allclose(combined.losses, vanilla.losses, atol=0, rtol=0) if alpha in (0.0, 1.0) else \
            torch.allclose(combined.losses, vanilla.losses)


def test_alpha_one_needs_no_generic_logps():
    combined, generic = p_dpo_loss(T([-1.0]), T([-2.0]), None, None, T([-1.0]), T([-2.0]), beta=0.5, alpha=1.0)
    assert generic is None and combined.losses.item() == pytest.approx(math.log(2))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="alpha"):
        p_dpo_loss(T([0.0]), T([0.0]), T([0.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.5, alpha=1.5)
    with pytest.raises(ValueError, match="generic"):
        p_dpo_loss(T([0.0]), T([0.0]), None, None, T([0.0]), T([0.0]), beta=0.5, alpha=0.5)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(T([0.0, 1.0]), T([0.0]), T([0.0]), T([0.0]), beta=0.5)


def test_chosen_nll_is_per_token():
    """Summed log-prob -6 over 3 tokens -> NLL 2 per token; a zero length is clamped to 1."""
    assert torch.allclose(chosen_nll(T([-6.0, -1.0]), torch.tensor([3, 0])), T([2.0, 1.0]))
