"""Tiny models and tokenizers built in-process: no network, seconds per test."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from prlhf.model.tiny import build_tiny_model, build_tiny_tokenizer

# Reference log-prob caches go to a throwaway folder, for this process and the subprocesses tests start.
os.environ.setdefault("PRLHF_CACHE_DIR", tempfile.mkdtemp(prefix="prlhf-test-cache-"))

TEXTS = ["Summarize: the quiet cat carried a map behind the school at dawn.",
         "The cat carried a map.", "The quiet cat carried a map behind the school. Nobody knew why.",
         "hello world, this is a small corpus for a tiny tokenizer"] * 20


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and CI has 2 cores
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


def tiny_architecture(arch: str, tokenizer, seed: int = 0):
    """A few-thousand-parameter random model of a given architecture, sharing the tiny tokenizer."""
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        return build_tiny_model(tokenizer, seed=seed, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **common))
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=1,
                                                  max_position_embeddings=256, **common))
    if arch == "gpt_neox":
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, max_position_embeddings=256, **common))
    raise ValueError(arch)


ARCHITECTURES = ["llama", "gpt2", "qwen2", "gpt_neox"]
