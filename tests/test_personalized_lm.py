"""The personalized LM on several architectures: soft-token placement, masking, reference, generation."""

import time

import pytest
import torch
from conftest import ARCHITECTURES, tiny_architecture

from prlhf.data.collate import IGNORE_INDEX, collate_pairs
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import adds_bos, encode_records
from prlhf.model.loading import add_lora, ensure_pad_token
from prlhf.model.logprobs import sequence_logps
from prlhf.model.personalized import PersonalizedLM
from prlhf.users.models import build_user_model

RECORDS = [PreferenceRecord("u1", "Summarize: the quiet cat.", "The cat.", "The quiet cat carried a map."),
           PreferenceRecord("u2", "hello world", "this is small", "a tiny corpus for a tokenizer")]


def make(arch, tokenizer, kind="individual", tokens=3, lora=True):
    base = tiny_architecture(arch, tokenizer)
    ensure_pad_token(tokenizer, base)
    d = base.get_input_embeddings().weight.shape[1]
    um = build_user_model(kind, 2, tokens, d, input_embeddings=base.get_input_embeddings().weight, seed=0)
    lm = add_lora(base, r=4, alpha=8, dropout=0.0) if lora else base
    return PersonalizedLM(lm, um, prefix_len=int(adds_bos(tokenizer))).eval()


def batch_for(tokenizer):
    pairs = encode_records(RECORDS, tokenizer)
    return collate_pairs(pairs, torch.tensor([1, 2]), torch.tensor([0, 1]), tokenizer.pad_token_id)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_user_tokens_go_after_bos_with_mask_and_labels(arch, tiny_tokenizer):
    model = make(arch, tiny_tokenizer)
    batch = batch_for(tiny_tokenizer)
    users = torch.tensor([1, 2, 1, 2])
    embeds, mask, labels = model.insert_user_tokens(batch.input_ids, batch.attention_mask, batch.labels, users)
    s, length = batch.input_ids.shape
    assert embeds.shape[:2] == (s, length + 3) and mask.shape == labels.shape == (s, length + 3)
    b = model.prefix_len
    assert torch.equal(embeds[:, b:b + 3], model.user_model(users))       # soft tokens right after BOS
    assert torch.equal(mask[:, b:b + 3], torch.ones(s, 3, dtype=mask.dtype))
    assert (labels[:, :b + 3] == IGNORE_INDEX).all()                       # never scored
    assert torch.equal(labels[:, b + 3:], batch.labels[:, b:])             # response labels kept, shifted by T_u
    word_embeds = model.lm.get_input_embeddings()(batch.input_ids)
    assert torch.equal(embeds[:, :b], word_embeds[:, :b]) and torch.equal(embeds[:, b + 3:], word_embeds[:, b:])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logps_match_a_manual_forward(arch, tiny_tokenizer):
    """forward() equals running the LM by hand on [prefix, soft tokens, rest] of one unpadded sequence."""
    model = make(arch, tiny_tokenizer)
    batch = batch_for(tiny_tokenizer)
    users = torch.tensor([1, 2, 1, 2])
    with torch.no_grad():
        logps = model(batch.input_ids, batch.attention_mask, batch.labels, users)
        row = 1
        n = int(batch.attention_mask[row].sum())
        ids, labels = batch.input_ids[row:row + 1, :n], batch.labels[row:row + 1, :n]
        emb = model.lm.get_input_embeddings()(ids)
        b = model.prefix_len
        full = torch.cat([emb[:, :b], model.user_model(users[row:row + 1]), emb[:, b:]], 1)
        lab = torch.cat([labels[:, :b], torch.full((1, 3), IGNORE_INDEX), labels[:, b:]], 1)
        manual = sequence_logps(model.lm(inputs_embeds=full).logits, lab)
    assert torch.allclose(logps[row], manual[0], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reference_is_base_without_user_tokens_or_adapters(arch, tiny_tokenizer):
    model = make(arch, tiny_tokenizer)
    batch = batch_for(tiny_tokenizer)
    with torch.no_grad():  # make the adapters matter
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
        ref = model.reference_logps(batch.input_ids, batch.attention_mask, batch.labels)
        with model.lm.disable_adapter():
            base = sequence_logps(model.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                  batch.labels)
        policy_no_users = model(batch.input_ids, batch.attention_mask, batch.labels, None)
    assert torch.allclose(ref, base, atol=1e-5)
    assert not torch.allclose(ref, policy_no_users, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_batched_cached_equals_single_uncached(arch, tiny_tokenizer):
    model = make(arch, tiny_tokenizer)
    tok = tiny_tokenizer
    prompts = [tok("Summarize: the quiet cat").input_ids, tok("hello").input_ids]
    users = torch.tensor([1, 2])
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=12, do_sample=False)
    cached = model.generate(prompts, users, **kw)
    uncached = model.generate(prompts, users, use_cache=False, **kw)
    singles = [model.generate([p], users[i:i + 1], **kw)[0] for i, p in enumerate(prompts)]
    assert cached == uncached == singles
    assert all(len(row) > 0 for row in cached)


def test_greedy_generation_follows_training_logps(tiny_tokenizer):
    """The tokens generate() picks greedily are the argmax under the same layout forward() scores."""
    model = make("llama", tiny_tokenizer)
    tok = tiny_tokenizer
    prompt = tok("Summarize: the quiet cat").input_ids
    new = model.generate([prompt], torch.tensor([1]), tok.pad_token_id, tok.eos_token_id, max_new_tokens=6,
                         do_sample=False)[0]
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        embeds, mask, _ = model.insert_user_tokens(ids, torch.ones_like(ids), None, torch.tensor([1]))
        logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[0]
    start = len(prompt) + model.num_user_tokens
    predicted = logits[start - 1:start - 1 + len(new)].argmax(-1).tolist()
    assert predicted == new


def test_uncached_generation_really_recomputes_everything(tiny_tokenizer):
    """Guard against a vacuous comparison: transformers ignores use_cache=False for inputs_embeds."""
    model = make("llama", tiny_tokenizer)
    tok = tiny_tokenizer
    widths = []
    hook = model.lm.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kw: widths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    prompt = tok("Summarize: the quiet cat").input_ids
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=4, min_new_tokens=4)
    model.generate([prompt], torch.tensor([1]), use_cache=False, **kw)
    hook.remove()
    start = len(prompt) + model.num_user_tokens
    assert widths == [start, start + 1, start + 2, start + 3]


def test_cached_generation_is_faster(tiny_tokenizer):
    model = make("llama", tiny_tokenizer, tokens=10)
    tok = tiny_tokenizer
    prompts = [tok("Summarize: the quiet cat carried a map behind the school").input_ids] * 4
    users = torch.tensor([1, 2, 1, 2])
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=128,
              min_new_tokens=128, do_sample=False)

    def timed(**extra):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model.generate(prompts, users, **kw, **extra)
            times.append(time.perf_counter() - t)
        return sorted(times)[1]  # median of 3

    model.generate(prompts, users, **kw)  # warm-up
    assert timed() < timed(use_cache=False)


def test_without_bos_user_tokens_go_first(tiny_tokenizer):
    """GPT-2-style tokenizers add no BOS: the user tokens then open the sequence."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert not adds_bos(tok)
    model = make("gpt2", tok)
    assert model.prefix_len == 0
    pairs = encode_records(RECORDS, tok)
    assert pairs[0].prompt_ids[0] != tok.bos_token_id
    batch = collate_pairs(pairs, torch.tensor([1, 2]), torch.tensor([0, 1]), tok.pad_token_id)
    users = torch.tensor([1, 2, 1, 2])
    embeds, mask, labels = model.insert_user_tokens(batch.input_ids, batch.attention_mask, batch.labels, users)
    assert torch.equal(embeds[:, :3], model.user_model(users))
    assert torch.equal(labels[:, 3:], batch.labels)
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=8, do_sample=False)
    prompts = [p.prompt_ids for p in pairs]
    assert model.generate(prompts, torch.tensor([1, 2]), **kw) == model.generate(prompts, torch.tensor([1, 2]),
                                                                                  use_cache=False, **kw)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_only_from_the_first_response_position_change_nothing(arch, tiny_tokenizer):
    """The output head runs on the last positions only (logits_to_keep): same log-probs, same gradients."""
    results = []
    for keep in (True, False):
        model = make(arch, tiny_tokenizer)
        model.share_prompts = False  # the one-forward-per-row path, where logits_to_keep applies
        if not keep:
            model._logits_to_keep = lambda width, first_label: None
        batch = batch_for(tiny_tokenizer)
        logps = model(batch.input_ids, batch.attention_mask, batch.labels, torch.tensor([1, 2, 1, 2]))
        logps.sum().backward()
        grads = [(p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for p in model.parameters()
                 if p.grad is not None]
        results.append((logps.detach(), grads))
    assert model._supports_logits_to_keep is None  # the patched model never asked
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert len(results[0][1]) == len(results[1][1]) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[0][1], results[1][1]))


def test_an_lm_without_adapters_needs_a_frozen_reference_copy(tiny_tokenizer):
    import copy

    model = make("llama", tiny_tokenizer, lora=False)
    batch = batch_for(tiny_tokenizer)
    with pytest.raises(TypeError, match="reference_lm="):  # before: pi_ref silently was the policy
        model.reference_logps(batch.input_ids, batch.attention_mask, batch.labels)
    with_copy = PersonalizedLM(model.lm, model.user_model, model.prefix_len,
                               reference_lm=copy.deepcopy(model.lm)).train()
    with torch.no_grad():
        frozen = with_copy.reference_logps(batch.input_ids, batch.attention_mask, batch.labels)
        for p in with_copy.lm.parameters():  # a "training step" on the policy
            p.add_(0.01 * torch.randn_like(p))
        after = with_copy.reference_logps(batch.input_ids, batch.attention_mask, batch.labels)
        policy = with_copy(batch.input_ids, batch.attention_mask, batch.labels, None)
    assert torch.equal(frozen, after) and not torch.allclose(after, policy, atol=1e-3)
    assert not with_copy.reference_lm.training and not any(p.requires_grad for p in with_copy.reference_lm.parameters())
    assert with_copy.lm is model.lm  # the policy is back after the reference pass
