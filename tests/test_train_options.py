"""Training options that trade memory, regularise users or keep the policy comparable with its reference:
--gradient-checkpointing, --user-weight-decay, --user-code-lr, --disable-dropout."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import save_tiny_architecture, tiny_architecture
from torch.utils.checkpoint import checkpoint
from test_train_resume import assert_same_weights, config

from prlhf.config import ConfigError, TrainConfig
from prlhf.model.loading import add_lora, disable_dropout
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.tiny import build_tiny_model
from prlhf.train.loop import train
from prlhf.train.setup import build_optimizer
from prlhf.users.models import build_user_model


def test_gradient_checkpointing_trains_the_same_weights(task_dir, tmp_path, monkeypatch):
    """Recomputing activations (dropout masks replayed from the saved RNG state) changes memory, not the result."""
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting_checkpoint)
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    # checkpointing turns shared prompts off, and with dropout on they draw other masks: compare like with like
    train(config(task_dir, plain, max_steps=3, share_prompts=False), show_progress=False)
    assert not calls
    train(config(task_dir, checkpointed, max_steps=3, gradient_checkpointing=True), show_progress=False)
    assert calls and set(calls) == {False}  # the layers were checkpointed, non-reentrant
    assert "gradient_checkpointing: true" in (checkpointed / "config.yaml").read_text()
    assert_same_weights(plain, checkpointed)


def tiny_personalized(kind: str, tokenizer) -> PersonalizedLM:
    """A tiny LoRA LM with a `kind` user model of 5 users, 2 tokens (3 clusters / rank 2)."""
    lm = add_lora(build_tiny_model(tokenizer, seed=0))
    users = build_user_model(kind, 5, 2, lm.get_input_embeddings().weight.shape[1], num_clusters=3, rank=2,
                             input_embeddings=lm.get_input_embeddings().weight)
    return PersonalizedLM(lm, users, prefix_len=1)


@pytest.mark.parametrize("kind", ["individual", "lowrank", "cluster"])
def test_user_weight_decay_reaches_only_the_per_user_rows(kind, tiny_tokenizer):
    model = tiny_personalized(kind, tiny_tokenizer)
    users = model.user_model
    cfg = TrainConfig(data="x", out="y", lr=1e-3, user_lr=1e-2, weight_decay=0.01, user_weight_decay=0.5)
    groups = build_optimizer(model, cfg).param_groups
    table = getattr(users, {"individual": "offsets", "lowrank": "vectors", "cluster": "weights"}[kind]).weight
    by_decay = {g["weight_decay"]: g["params"] for g in groups if g["lr"] == 1e-2}
    assert [id(p) for p in by_decay[0.5]] == [id(table)]  # only the per-user table decays
    shared = {id(p) for p in users.parameters()} - {id(table)}
    assert {id(p) for p in by_decay[0.0]} == shared and shared  # e_0 / prototypes / up-projection: no decay
    assert [g["weight_decay"] for g in groups if g["lr"] == 1e-3] == [0.01]  # the adapters keep theirs

    # A row is decayed only when its user is in the batch: here users 1 and 3, with a zero loss gradient.
    optimizer = build_optimizer(model, cfg)
    before = table.detach().clone()
    (users(torch.tensor([1, 3])) * 0).sum().backward()
    optimizer.step()
    assert torch.allclose(table[[1, 3]], before[[1, 3]] * (1 - 1e-2 * 0.5))
    assert torch.equal(table[[0, 2, 4, 5]], before[[0, 2, 4, 5]])


@pytest.mark.parametrize("kind", ["individual", "lowrank", "cluster"])
def test_user_code_lr_reaches_only_cluster_logits_and_lowrank_vectors(kind, tiny_tokenizer):
    model = tiny_personalized(kind, tiny_tokenizer)
    users = model.user_model
    cfg = TrainConfig(data="x", out="y", lr=1e-3, user_lr=1e-2, user_code_lr=0.3, user_weight_decay=0.5)
    groups = build_optimizer(model, cfg).param_groups
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    table = {"individual": None, "lowrank": "vectors", "cluster": "weights"}[kind]
    codes = {id(getattr(users, table).weight)} if table else set()
    assert by_lr.get(0.3, set()) == codes
    assert by_lr[1e-2] == {id(p) for p in users.parameters()} - codes  # soft tokens, e_0, prototypes, U
    assert [g["weight_decay"] for g in groups if g["lr"] == 0.3] == ([0.5] if codes else [])  # still per-user rows
    # 0 = the user-model rate: one rate for the whole user model, as before the option existed
    plain = build_optimizer(model, TrainConfig(data="x", out="y", lr=1e-3, user_lr=1e-2)).param_groups
    assert {g["lr"] for g in plain} == {1e-3, 1e-2}
    with pytest.raises(ConfigError, match="learning rates"):
        TrainConfig(data="x", out="y", user_code_lr=-1.0).validate()


def test_negative_user_weight_decay_is_refused():
    with pytest.raises(ConfigError, match="weight decays"):
        TrainConfig(data="x", out="y", user_weight_decay=-1.0).validate()


def test_runs_in_one_process_may_change_precision(task_dir, tmp_path):
    """Accelerate fixes one precision per process; a notebook or a bench training in turn must not trip on it."""
    for name, precision in (("bf16", "bf16"), ("fp32", "no"), ("bf16_again", "bf16")):
        summary = train(config(task_dir, tmp_path / name, max_steps=1, mixed_precision=precision),
                        show_progress=False)
        assert summary["steps"] == 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_disable_dropout_makes_a_training_forward_deterministic(arch, tiny_tokenizer):
    """GPT-2 drops through nn.Dropout modules; Llama's attention reads a float `attention_dropout`."""
    model = tiny_architecture("gpt2", tiny_tokenizer) if arch == "gpt2" else \
        build_tiny_model(tiny_tokenizer, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         attention_dropout=0.5)
    ids = torch.tensor([tiny_tokenizer("The quiet cat carried a map behind the school.")["input_ids"]])
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout on: two draws differ
    assert disable_dropout(model) > 0
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert disable_dropout(model) == 0  # nothing left to turn off


def test_vanilla_dpo_starts_at_the_reference_with_dropout_off(task_dir, tmp_path, tiny_tokenizer):
    """The reference's log-probs are computed without dropout. With GPT-2's 0.1 dropout left on, the policy's
    first forward (LoRA's B = 0: the same weights) already differs from them; with the default disable_dropout,
    vanilla DPO's first loss is log 2 and its implicit rewards are 0, as they must be."""
    folder = save_tiny_architecture("gpt2", tiny_tokenizer, tmp_path / "gpt2")
    first = {}
    for off in (True, False):
        out = tmp_path / f"dropout_off_{off}"
        train(TrainConfig(data=str(task_dir / "train.jsonl"), out=str(out), model=str(folder), user_model="uniform",
                          max_steps=1, log_steps=1, batch_size=12, disable_dropout=off, reference_cache="none",
                          report_to="none", threads=1), show_progress=False)
        first[off] = json.loads((out / "metrics.jsonl").open().readline())
    assert first[True]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first[True]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert abs(first[False]["loss"] - math.log(2)) > 1e-3  # the test would see dropout left on
