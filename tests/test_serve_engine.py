"""The serving engine on four architectures: a row decodes the same tokens alone, joined into a running batch at
a step boundary (continuous batching), and after its user's cached prefix; finished rows leave, and a cache that
cannot be joined falls back to batches that start together."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, tiny_architecture
from prlhf.model.loading import add_lora
from prlhf.model.personalized import PersonalizedLM
from prlhf.serve.engine import Engine, Row
from prlhf.serve.sampling import Sampling, row_generators
from prlhf.serve.users import ServedUsers
from prlhf.users.models import build_user_model
from prlhf.users.registry import UserRegistry

USERS = ["a", "b", "c"]


def personalized(arch: str, tokenizer) -> PersonalizedLM:
    lm = add_lora(tiny_architecture(arch, tokenizer), r=4, dropout=0.0, target_modules="all-linear")
    for name, p in lm.named_parameters():  # LoRA's B starts at zero: move it so the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    hidden = lm.get_input_embeddings().weight.shape[1]
    users = build_user_model("individual", len(USERS), 2, hidden, input_embeddings=lm.get_input_embeddings().weight)
    return PersonalizedLM(lm, users, prefix_len=1).eval()


def make_rows(tokenizer, specs, max_tokens=10, temperature=0.0, seed=0):
    gens = row_generators(seed, len(specs))
    return [Row(tokenizer(prompt).input_ids, user, Sampling(max_tokens, temperature, ignore_eos=True), g,
                sink=lambda event: None) for (prompt, user), g in zip(specs, gens)]


def engine(model, tokenizer, **kwargs) -> Engine:
    users = ServedUsers(None, model.user_model, UserRegistry(USERS))
    return Engine(model, tokenizer, users, **kwargs)


SPECS = [("The quiet cat carried a map behind", "a"), ("hello world", "b"), ("Summarize: the cat", "zzz"),
         ("The cat carried", "c"), ("hello", "a")]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_row_decodes_the_same_alone_joined_midway_and_from_a_cached_prefix(arch, tiny_tokenizer):
    model = personalized(arch, tiny_tokenizer)
    plain = engine(model, tiny_tokenizer, prefix_cache_bytes=0)
    alone = []
    for spec in SPECS:
        (row,) = make_rows(tiny_tokenizer, [spec])
        plain.decode([row])
        alone.append(row.tokens)
    assert len({tuple(t) for t in alone}) > 1

    cached = engine(model, tiny_tokenizer)
    first, later = make_rows(tiny_tokenizer, SPECS[:2]), make_rows(tiny_tokenizer, SPECS[2:])
    cached._queue.put_nowait(later)  # waiting when the batch starts: joins after the first step
    steps = []
    cached.on_batch = lambda stats: steps.append(stats.rows)
    cached.decode(first)
    assert steps[0] == 2 and max(steps) == len(SPECS)
    assert [r.tokens for r in first + later] == alone
    assert (cached.prefixes.misses, cached.prefixes.hits) == (4, 1)  # rows of a, b; then generic and c new, a cached

    again = make_rows(tiny_tokenizer, SPECS)
    cached.decode(again)  # every user's prefix is cached now
    assert [r.tokens for r in again] == alone and cached.prefixes.hits == 1 + len(SPECS)


def test_rows_that_finish_leave_the_batch_and_sampling_is_per_row(tiny_tokenizer):
    model = personalized("llama", tiny_tokenizer)
    eng = engine(model, tiny_tokenizer)
    short = make_rows(tiny_tokenizer, SPECS[:1], max_tokens=2)
    long = make_rows(tiny_tokenizer, SPECS[1:2], max_tokens=8)
    steps = []
    eng.on_batch = lambda stats: steps.append(stats.rows)
    eng.decode(short + long)
    assert [len(r.tokens) for r in short + long] == [2, 8] and steps == [2, 2] + [1] * 6
    # the same seed gives the same sample whatever else is in the batch; another seed differs
    one = make_rows(tiny_tokenizer, SPECS[:1], max_tokens=12, temperature=1.0, seed=5)
    eng.decode(one)
    mixed = make_rows(tiny_tokenizer, SPECS[:1], max_tokens=12, temperature=1.0, seed=5)
    eng.decode(mixed + make_rows(tiny_tokenizer, SPECS[1:4], max_tokens=12, temperature=0.7, seed=9))
    other = make_rows(tiny_tokenizer, SPECS[:1], max_tokens=12, temperature=1.0, seed=6)
    eng.decode(other)
    assert mixed[0].tokens == one[0].tokens and other[0].tokens != one[0].tokens


def test_a_cache_that_cannot_be_joined_waits_for_the_next_batch(tiny_tokenizer, monkeypatch):
    import prlhf.serve.engine as engine_module

    model = personalized("llama", tiny_tokenizer)
    monkeypatch.setattr(engine_module, "joinable", lambda cache: False)  # e.g. a sliding-window cache
    eng = engine(model, tiny_tokenizer)
    first, later = make_rows(tiny_tokenizer, SPECS[:2]), make_rows(tiny_tokenizer, SPECS[2:])
    eng._queue.put_nowait(later)
    eng.decode(first)
    assert all(r.finish_reason == "length" for r in first) and all(not r.tokens for r in later)
    assert eng.prefixes is None  # the prefix cache needs joinable caches too


def test_decoding_waits_while_a_fit_borrows_the_lm(tiny_tokenizer):
    """A fit's reference pass turns the shared LM's adapters off while it borrows the LM: no step is decoded then."""
    import threading
    import time

    model = personalized("llama", tiny_tokenizer)
    eng = engine(model, tiny_tokenizer)
    (alone,) = make_rows(tiny_tokenizer, SPECS[:1])
    eng.decode([alone])
    rows = make_rows(tiny_tokenizer, SPECS[:1])
    with eng.lm_gate.borrow():  # what fit_rows(..., reference_guard=engine.lm_gate.borrow()) enters
        with model.reference():  # adapters off, as during that pass
            worker = threading.Thread(target=eng.decode, args=(rows,))
            worker.start()
            time.sleep(0.3)
            assert rows[0].tokens == []  # still waiting at its prefill
    worker.join(30)
    assert rows[0].tokens == alone.tokens  # decoded with the adapters on, once the LM was given back
