"""Tiny models and tokenizers built in-process: no network, seconds per test."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from prlhf.data.tasks import build_length_task
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


def save_tiny_architecture(arch: str, tokenizer, folder: Path) -> Path:
    """A tiny model of `arch` and its tokenizer as a local model folder, loadable like a hub checkpoint."""
    tiny_architecture(arch, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A 4-user length task shared by the training tests (3 seen users x 12 pairs = 9 batches of 4)."""
    task = build_length_task(n_seen_users=3, n_unseen_users=1, n_prompts=40, train_pairs_per_user=12,
                             test_pairs_per_user=4, seed=0)
    out = tmp_path_factory.mktemp("task") / "data"
    task.write(out)
    return out


def write_persona_traits(folder: Path, n: int = 20) -> Path:
    """A fake persona folder in the upstream format: half the statements answered ' Yes' by the trait."""
    folder.mkdir(parents=True, exist_ok=True)
    from prlhf.data.tasks.persona import DIMENSIONS

    for dim, poles in DIMENSIONS.items():
        for pole in poles:
            rows = [{"question": f"Is the following statement something you would say?\n\"{pole} says {i}\"",
                     "statement": f"{pole} says {i}", "label_confidence": 0.9,
                     "answer_matching_behavior": " Yes" if i % 2 else " No",
                     "answer_not_matching_behavior": " No" if i % 2 else " Yes"} for i in range(n)]
            (folder / f"{pole}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
