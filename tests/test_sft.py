"""The tiny model's supervised warm-up: held-out prompts split off whole, early stopping keeps the best weights."""

import pytest
import torch

from prlhf.data.tokenize import EncodedPair
from prlhf.model.tiny import build_tiny_model
from prlhf.train.sft import holdout_nll, split_by_prompt, supervised_warmup


def _pairs(tokenizer, n_prompts: int = 10, per_prompt: int = 3) -> list[EncodedPair]:
    eos = tokenizer.eos_token_id
    out = []
    for i in range(n_prompts):
        prompt = tokenizer(f"Summarize story {i}.").input_ids
        for j in range(per_prompt):
            out.append(EncodedPair(prompt, tokenizer(f" The cat {j} sat.").input_ids[1:] + [eos],
                                   tokenizer(f" A dog {i} ran far away.").input_ids[1:] + [eos], f"u{j}"))
    return out


def test_split_by_prompt_keeps_a_prompts_pairs_together(tiny_tokenizer):
    pairs = _pairs(tiny_tokenizer)
    train, held = split_by_prompt(pairs, 0.2, seed=0)
    assert len(held) == 2 * 3 and len(train) + len(held) == len(pairs)
    assert not {tuple(p.prompt_ids) for p in train} & {tuple(p.prompt_ids) for p in held}
    assert split_by_prompt(pairs, 0.2, seed=0) == (train, held)  # seeded
    assert split_by_prompt(pairs, 0.0, seed=0) == (pairs, [])
    assert split_by_prompt(pairs[:3], 0.5, seed=0) == (pairs[:3], [])  # one prompt: nothing to hold out


def test_warmup_without_holdout_runs_every_step(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=0)
    result = supervised_warmup(model, _pairs(tiny_tokenizer), tiny_tokenizer.pad_token_id, steps=7, batch_size=4,
                               show_progress=False)
    assert result.steps == 7 and result.holdout_nll is None and result.train_nll > 0


def test_early_stopping_leaves_the_best_measured_weights(tiny_tokenizer):
    pairs = _pairs(tiny_tokenizer)
    train, held = split_by_prompt(pairs, 0.3, seed=0)
    model = build_tiny_model(tiny_tokenizer, seed=0)
    # a rate this high makes the held-out NLL rise again soon, so patience 1 stops well before 400 steps
    result = supervised_warmup(model, train, tiny_tokenizer.pad_token_id, steps=400, batch_size=4, lr=3e-2,
                               show_progress=False, holdout=held, eval_every=5, patience=1)
    assert result.steps % 5 == 0 and result.steps < 400
    assert abs(holdout_nll(model, held, tiny_tokenizer.pad_token_id, 4) - result.holdout_nll) < 1e-4
    assert not model.training
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tiny_defaults_by_objective():
    from prlhf.config import ConfigError, TrainConfig

    policy, reward = TrainConfig(model="tiny"), TrainConfig(model="tiny", objective="rm")
    assert (policy.resolved_sft_steps(), policy.resolved_epochs()) == (0, 3.0)
    assert (reward.resolved_sft_steps(), reward.resolved_epochs()) == (0, 6.0)  # no warm-up: more passes to fit
    assert TrainConfig(model="some/hub-model", objective="rm").resolved_epochs() == 3.0
    assert TrainConfig(model="tiny", objective="rm", epochs=2.5).resolved_epochs() == 2.5  # given: kept
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(data="x", out="y", epochs=0).validate()
