"""The on-disk reference log-prob cache: reused when nothing changed, recomputed when anything did."""

import torch
from conftest import tiny_architecture

import prlhf.train.reference as reference
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import encode_records
from prlhf.model.loading import add_lora
from prlhf.model.personalized import PersonalizedLM
from prlhf.train.reference import cached_reference_logps, reference_cache_key
from prlhf.users.models import build_user_model

RECORDS = [PreferenceRecord("u1", "Summarize: the quiet cat.", "The cat.", "The quiet cat carried a map."),
           PreferenceRecord("u2", "hello world", "this is small", "a tiny corpus for a tokenizer")]


def make_model(tokenizer, seed=0):
    base = tiny_architecture("llama", tokenizer, seed=seed)
    um = build_user_model("individual", 2, 2, base.config.hidden_size, init="uniform")
    return PersonalizedLM(add_lora(base, r=2, alpha=4, dropout=0.0), um, prefix_len=1).eval()


def test_second_run_reuses_the_cache(tmp_path, tiny_tokenizer, monkeypatch):
    model = make_model(tiny_tokenizer)
    pairs = encode_records(RECORDS, tiny_tokenizer)
    first = cached_reference_logps(model, pairs, tiny_tokenizer.pad_token_id, tmp_path, show_progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def must_not_compute(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(reference, "compute_reference_logps", must_not_compute)
    again = cached_reference_logps(model, pairs, tiny_tokenizer.pad_token_id, tmp_path, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_key_changes_with_data_tokens_weights_and_precision(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    pairs = encode_records(RECORDS, tiny_tokenizer)
    key = reference_cache_key(model, pairs, "no")
    assert reference_cache_key(model, pairs, "no") == key                                    # deterministic
    assert reference_cache_key(model, pairs[:1], "no") != key                                # data
    assert reference_cache_key(model, encode_records(RECORDS, tiny_tokenizer, max_length=6), "no") != key  # tokens
    assert reference_cache_key(model, pairs, "bf16") != key                                  # precision
    assert reference_cache_key(make_model(tiny_tokenizer, seed=1), pairs, "no") != key       # reference weights
    with torch.no_grad():  # adapters and the user model are not part of the reference
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith("user_model"):
                p.add_(1.0)
    assert reference_cache_key(model, pairs, "no") == key


def test_cache_off_always_computes(tmp_path, tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    pairs = encode_records(RECORDS, tiny_tokenizer)
    chosen, rejected = cached_reference_logps(model, pairs, tiny_tokenizer.pad_token_id, None, show_progress=False)
    assert chosen.shape == rejected.shape == (2,)
    assert not list(tmp_path.iterdir())


def test_a_damaged_cache_is_computed_again_and_replaced(tmp_path, tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    pairs = encode_records(RECORDS, tiny_tokenizer)
    first = cached_reference_logps(model, pairs, tiny_tokenizer.pad_token_id, tmp_path, show_progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:20])  # cut short, as by a full disk
    again = cached_reference_logps(model, pairs, tiny_tokenizer.pad_token_id, tmp_path, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # replaced, no temporary file left
    assert reference._read_cache(path, len(pairs)) is not None
    assert reference._read_cache(path, len(pairs) + 1) is None  # the wrong size is not trusted either
