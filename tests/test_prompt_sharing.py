"""Shared-prompt scoring gives the same log-probs and gradients as one full forward per row, on every
architecture, and really runs one prefix per distinct (user, prompt)."""

import pytest
import torch
from conftest import ARCHITECTURES, tiny_architecture

from prlhf.data.collate import collate_pairs
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import adds_bos, encode_records
from prlhf.model.loading import add_lora, ensure_pad_token
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.prompt_sharing import RowLayout, group_by_prompt
from prlhf.train.loop import policy_logps, train
from prlhf.users.models import build_user_model

# Prompts of different lengths, one-token and multi-token answers, and one prompt rated by two users.
RECORDS = [PreferenceRecord("u1", "Summarize: the quiet cat.", "The cat.", "The quiet cat carried a map."),
           PreferenceRecord("u2", "hello world", " Yes", " No"),
           PreferenceRecord("u1", "hello world", " No", " Yes"),
           PreferenceRecord("u2", "Is this a small corpus for a tiny tokenizer?", "yes", "no, it is a corpus")]


def make(arch, tokenizer, share: bool):
    base = tiny_architecture(arch, tokenizer)
    ensure_pad_token(tokenizer, base)
    d = base.get_input_embeddings().weight.shape[1]
    um = build_user_model("individual", 2, 3, d, input_embeddings=base.get_input_embeddings().weight, seed=0)
    lm = add_lora(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # non-zero adapters, so their gradients are not trivially equal
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return PersonalizedLM(lm, um, prefix_len=int(adds_bos(tokenizer)), share_prompts=share).eval()


def policy_rows(tokenizer):
    """The training loop's layout: chosen rows, rejected rows, then both again under the generic user 0."""
    batch = collate_pairs(encode_records(RECORDS, tokenizer), torch.tensor([1, 2, 1, 2]), torch.arange(4),
                          tokenizer.pad_token_id)
    users = torch.cat([batch.user_idx.repeat(2), torch.zeros(8, dtype=torch.long)])
    return batch.input_ids.repeat(2, 1), batch.attention_mask.repeat(2, 1), batch.labels.repeat(2, 1), users


def logps_and_grads(model, rows, weights):
    model.zero_grad()
    logps = model(*rows)
    (logps * weights).sum().backward()
    grads = {n: p.grad.detach().to_dense() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_prompts_match_full_forward_in_value_and_gradient(arch, tiny_tokenizer):
    rows = policy_rows(tiny_tokenizer)
    weights = torch.randn(rows[0].shape[0], generator=torch.Generator().manual_seed(0))
    full_logps, full_grads = logps_and_grads(make(arch, tiny_tokenizer, share=False), rows, weights)
    shared = make(arch, tiny_tokenizer, share=True)
    calls = []
    shared.lm.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw["inputs_embeds"].shape[0]),
                                        with_kwargs=True)
    shared_logps, shared_grads = logps_and_grads(shared, rows, weights)
    # 16 rows; distinct (user, prompt): 4 prompts under their users (u1 and u2 each rate "hello world") + 3 under e_0
    assert calls == [7, 16]
    assert shared.share_prompts
    assert torch.allclose(shared_logps, full_logps, atol=1e-5), (shared_logps - full_logps).abs().max()
    assert full_grads.keys() == shared_grads.keys()
    assert any("lora" in n for n in full_grads) and any("user_model" in n for n in full_grads)
    for name, g in full_grads.items():
        assert torch.allclose(shared_grads[name], g, atol=1e-5), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_rows_share_prompts_too(arch, tiny_tokenizer):
    ids, mask, labels, _ = policy_rows(tiny_tokenizer)
    full = make(arch, tiny_tokenizer, share=False).reference_logps(ids, mask, labels)
    shared = make(arch, tiny_tokenizer, share=True).reference_logps(ids, mask, labels)
    assert torch.allclose(shared, full, atol=1e-5)


def test_grouping_keys_on_user_and_prompt_and_declines_when_nothing_is_shared(tiny_tokenizer):
    ids, mask, labels, users = policy_rows(tiny_tokenizer)
    groups = group_by_prompt(ids, mask, labels, users)
    assert groups is not None and len(groups.first_row) == 7
    for row in range(16):  # each row continues a prefix with its own user and its own prompt tokens
        first = int(groups.first_row[groups.prefix_of[row]])
        start = int(groups.starts[row])
        assert users[first] == users[row] and torch.equal(ids[first, :start], ids[row, :start])
    assert len(group_by_prompt(ids, mask, labels, None).first_row) == 3  # no users: 3 distinct prompts
    distinct = torch.arange(4)  # the chosen rows: one per (user, prompt), nothing to share
    assert group_by_prompt(ids[distinct], mask[distinct], labels[distinct], users[distinct]) is None
    unlabelled = labels.clone()
    unlabelled[0] = -100
    assert group_by_prompt(ids, mask, unlabelled, users) is None


def same_groups(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (torch.equal(a.starts, b.starts) and torch.equal(a.prefix_of, b.prefix_of)
            and torch.equal(a.first_row, b.first_row) and (a.prefix_width, a.continuation_width)
            == (b.prefix_width, b.continuation_width))


def test_the_collators_layout_groups_rows_as_reading_the_tensors_does(tiny_tokenizer):
    """The training loop hands the forward a layout built on the host from the collator's: the same groups as
    reading the ids back from the device, for each of the loop's row layouts."""
    batch = collate_pairs(encode_records(RECORDS, tiny_tokenizer), torch.tensor([1, 2, 1, 2]), torch.arange(4),
                          tiny_tokenizer.pad_token_id)
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    users2 = batch.user_idx.repeat(2)
    users4 = torch.cat([users2, torch.zeros(8, dtype=torch.long)])
    cases = [(RowLayout.of_pairs(batch.layout, None), (ids, mask, labels, None)),
             (RowLayout.of_pairs(batch.layout, users2.tolist()), (ids, mask, labels, users2)),
             (RowLayout.of_pairs(batch.layout, users4.tolist(), copies=2),
              (ids.repeat(2, 1), mask.repeat(2, 1), labels.repeat(2, 1), users4))]
    for layout, rows in cases:
        read = RowLayout.from_tensors(*rows)
        assert (layout.starts, layout.lengths) == (read.starts, read.lengths)
        assert same_groups(layout.groups("cpu"), group_by_prompt(*rows))
    distinct = [len(layout.groups("cpu").first_row) for layout, _ in cases]
    assert distinct == [3, 4, 7]  # prompts; (user, prompt); and the same again under e_0 (3 prompts)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_policy_logps_with_the_collators_layout_match_reading_the_tensors(alpha, tiny_tokenizer):
    model = make("llama", tiny_tokenizer, share=True)
    batch = collate_pairs(encode_records(RECORDS, tiny_tokenizer), torch.tensor([1, 2, 1, 2]), torch.arange(4),
                          tiny_tokenizer.pad_token_id)
    with_layout = policy_logps(model, batch, True, alpha < 1)
    batch.layout = None  # the forward then reads the layout from the tensors
    without = policy_logps(model, batch, True, alpha < 1)
    for a, b in zip(with_layout, without):
        assert (a is None and b is None) or torch.equal(a, b)


def test_training_with_shared_prompts_reaches_the_same_weights(task_dir, tmp_path, monkeypatch):
    """Three P-DPO steps (LoRA dropout off: with it on, a shared prompt draws one mask for all its rows)."""
    from test_invariants import max_difference_over_lr
    from test_train_resume import config, trained_weights

    shared_calls = []
    real = PersonalizedLM._forward_shared_prompts

    def counting(self, *args):
        shared_calls.append(self.training)
        return real(self, *args)

    monkeypatch.setattr(PersonalizedLM, "_forward_shared_prompts", counting)
    runs = {}
    for share in (False, True):
        out = tmp_path / f"share_{share}"
        cfg = config(task_dir, out, max_steps=3, lora_dropout=0.0, share_prompts=share)
        train(cfg, show_progress=False)
        runs[share] = trained_weights(out)
        assert (True in shared_calls) == share  # training steps took the shared path only when asked
    assert runs[True].keys() == runs[False].keys()
    assert any(k.startswith("user_model.") for k in runs[True]) and any("lora_B" in k for k in runs[True])
    # The same sums in another order. The gradients agree to rounding (the gradient test above), but AdamW's
    # first step is lr * g / (|g| + eps): where a gradient is near eps its rounding moves the weight by a
    # fraction of lr. Run alone this test measured 1.17e-2 of lr (k_proj lora_B, from step 1 on; lr 1e-3), so
    # the old 1e-5 absolute bound held only in the full suite's order; 5e-2 of lr still catches a wrong step,
    # which moves weights by whole multiples of lr.
    diff = max_difference_over_lr(tmp_path / "share_False", tmp_path / "share_True", cfg)
    print(f"shared vs unshared prompts: max |weight difference| / group lr = {diff:.3e}")
    assert diff <= 5e-2, diff
