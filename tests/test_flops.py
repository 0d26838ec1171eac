"""The speed benchmark's FLOP count: the model's shapes read right, and each method's count follows from its
structure (what prompt sharing saves, what the generic copies and an in-step reference add)."""

import pytest
import torch
from conftest import tiny_architecture

from prlhf.bench.flops import ModelShape, matmul_rates, pair_flops
from prlhf.data.tokenize import EncodedPair


def test_model_shape_counts_every_linear_layer_but_the_head(tiny_tokenizer):
    base = tiny_architecture("llama", tiny_tokenizer)
    c = base.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    shape = ModelShape.of(base, lora_r=4)
    assert shape.linear == c.num_hidden_layers * per_layer
    assert shape.head == c.hidden_size * c.vocab_size
    assert shape.attention == c.num_hidden_layers * q
    assert shape.lora == 4 * c.num_hidden_layers * (2 * (c.hidden_size + q) + 2 * (c.hidden_size + kv)
                                                      + 3 * (c.hidden_size + c.intermediate_size))


def test_each_methods_count_follows_from_its_structure(tiny_tokenizer):
    shape = ModelShape.of(tiny_architecture("llama", tiny_tokenizer), lora_r=4)
    pair = EncodedPair(list(range(200)), list(range(40)), list(range(30)), "u")
    f = {m: pair_flops(shape, pair, m, user_tokens=1) for m in
         ("trl_dpo", "trl_dpo_precomputed", "prlhf_dpo", "prlhf_pdpo_a1", "prlhf_pdpo_a05")}
    assert f["trl_dpo"]["step"] == pytest.approx(f["trl_dpo_precomputed"]["step"] + f["trl_dpo"]["reference"])
    assert f["prlhf_pdpo_a05"]["step"] == pytest.approx(2 * f["prlhf_pdpo_a1"]["step"])
    assert f["prlhf_dpo"]["step"] < f["prlhf_pdpo_a1"]["step"]  # one user token more per row
    # the 200-token prompt once instead of twice: well under TRL's count, above half of it
    ratio = f["prlhf_dpo"]["step"] / f["trl_dpo_precomputed"]["step"]
    assert 0.5 < ratio < 0.75
    assert f["prlhf_dpo"]["reference"] < f["trl_dpo"]["reference"]


def test_matmul_rates_cover_the_models_linear_shapes(tiny_tokenizer):
    shape = ModelShape.of(tiny_architecture("llama", tiny_tokenizer), lora_r=4)
    rates = matmul_rates(shape, tokens=64, dtype=torch.float32, seconds=0.01)
    assert len(rates) == len(shape.linears) and all(r > 0 for r in rates.values())
