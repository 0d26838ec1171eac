"""Loop-level invariants of a short P-DPO run, in the habit of TRL's trainer tests: the base weights are bitwise
those the run started DPO from, the reference log-probs are those it trained against, and only the rows of the
users that were in a training batch moved.

One short run (module fixture) is watched from inside `prlhf.train.loop`: its policy's state when DPO starts (at
`build_optimizer`, after the warm-up and with fresh adapters), the reference log-probs it trains against and the
policy it saves at the end. The base is not part of a saved run (load_run reads RUN_DIR/base), so the trained
policy in memory is the only place a changed base would show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import prlhf.train.loop as loop
from prlhf.data.collate import collate_pairs
from prlhf.data.loading import load_records
from prlhf.data.tasks import build_length_task
from prlhf.data.tokenize import EncodedPair
from prlhf.model.logprobs import sequence_logps
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.scoring import compute_reference_logps
from prlhf.runs.directory import LoadedRun, load_run
from prlhf.train.batching import EpochBatchSampler
from prlhf.train.loop import train
from test_train_resume import config

# 6 users x 3 pairs; 2 steps of 2 pairs see at most 4 users, so at least 2 registered users are never in a batch.
# A short warm-up (sft_steps from TINY) so that the base DPO starts from is not the freshly built tiny model.
# user_weight_decay > 0: an optimizer that decayed every row at every step (a dense AdamW) would move the rows
# of absent users too. fp32 and no reference cache: the reference log-probs are computed in this process, by the
# same function the tests call afterwards.
SHORT = dict(batch_size=2, max_steps=2, save_steps=100, log_steps=1, user_weight_decay=0.1, mixed_precision="no",
             reference_cache="none", report_to="none")


@dataclass
class WatchedRun:
    path: Path
    records: list
    pairs: list[EncodedPair]          # the training pairs, in the loop's dataset order
    pad_id: int
    start: dict[str, dict[str, torch.Tensor]]  # "base" / "lora" / "rows" when DPO starts
    start_reference: tuple[torch.Tensor, torch.Tensor]  # (chosen, rejected) the loop trained against
    trained: PersonalizedLM           # the policy the loop saved
    loaded: LoadedRun


def base_weights(policy: PersonalizedLM) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor of the policy's LM, under the names the plain HF model gives it."""
    state = policy.lm.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def lora_weights(policy: PersonalizedLM) -> dict[str, torch.Tensor]:
    return {k: v for k, v in policy.lm.state_dict().items() if "lora_" in k}


def user_rows(policy: PersonalizedLM) -> torch.Tensor:
    return policy.user_model.state_dict()[policy.user_model.row_key]  # (N+1, T_u*d)


def cloned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> WatchedRun:
    data = tmp_path_factory.mktemp("loop_data") / "data"
    build_length_task(n_seen_users=6, n_unseen_users=0, n_prompts=20, train_pairs_per_user=3,
                      test_pairs_per_user=1, seed=0).write(data)
    run_dir = tmp_path_factory.mktemp("loop_run") / "run"
    seen = {}
    build_optimizer, reference_logps, save_run = loop.build_optimizer, loop.cached_reference_logps, loop.save_run

    def snapshot_then_build(model, cfg):
        seen["start"] = {"base": cloned(base_weights(model)), "lora": cloned(lora_weights(model)),
                         "rows": user_rows(model).detach().clone()}
        return build_optimizer(model, cfg)

    def keep_reference(model, pairs, pad_id, *args, **kwargs):
        seen["pairs"], seen["pad_id"] = pairs, pad_id
        seen["reference"] = reference_logps(model, pairs, pad_id, *args, **kwargs)
        return seen["reference"]

    def keep_policy(run_dir, model, *args, **kwargs):
        seen["trained"] = model
        return save_run(run_dir, model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "build_optimizer", snapshot_then_build)
        m.setattr(loop, "cached_reference_logps", keep_reference)
        m.setattr(loop, "save_run", keep_policy)
        summary = train(config(data, run_dir, **SHORT), show_progress=False)
    assert summary["steps"] == SHORT["max_steps"] and summary["user_model"] == "individual"
    return WatchedRun(run_dir, load_records(data / "train.jsonl"), seen["pairs"], seen["pad_id"], seen["start"],
                      seen["reference"], seen["trained"], load_run(run_dir))


def test_base_weights_are_bitwise_the_base_dpo_started_from(watched):
    saved = AutoModelForCausalLM.from_pretrained(watched.path / "base").state_dict()  # after the warm-up
    start, trained = watched.start["base"], base_weights(watched.trained)
    assert trained.keys() == saved.keys() == start.keys()  # every base tensor is compared, tied head included
    assert all(torch.equal(start[k], saved[k]) for k in saved)  # RUN_DIR/base is what DPO started from
    changed = sorted(k for k in saved if not torch.equal(trained[k], saved[k]))
    assert not changed, f"training changed {len(changed)} base tensors: {changed[:3]}"
    # ... while every adapter tensor moved (lora_B starts at 0, lora_A gets a gradient from step 2 on)
    lora_start, lora_end = watched.start["lora"], lora_weights(watched.trained)
    assert lora_start and lora_start.keys() == lora_end.keys()
    assert all(not torch.equal(lora_start[k], lora_end[k]) for k in lora_start)


def test_reference_logps_are_unchanged_by_training(watched):
    pairs, pad_id = watched.pairs, watched.pad_id
    start_chosen, start_rejected = watched.start_reference
    # The same computation as the loop's before its first step (same batches, same code), so bitwise equal:
    # from the policy in memory after training, and from the run as it loads for evaluation.
    for where, model in (("in memory", watched.trained), ("loaded", watched.loaded.model)):
        chosen, rejected = compute_reference_logps(model, pairs, pad_id, show_progress=False)
        diff = max((chosen - start_chosen).abs().max().item(), (rejected - start_rejected).abs().max().item())
        assert torch.equal(chosen, start_chosen) and torch.equal(rejected, start_rejected), f"{where}: {diff:.3g}"
    assert watched.loaded.encode(watched.records) == pairs

    # pi_ref is the plain base: RUN_DIR/base scored directly, all pairs in one padded batch, no user tokens.
    batch = collate_pairs(pairs, torch.zeros(len(pairs), dtype=torch.long), torch.arange(len(pairs)), pad_id)
    base = AutoModelForCausalLM.from_pretrained(watched.path / "base").eval()
    with torch.no_grad():
        direct = sequence_logps(base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                batch.labels)
        policy = watched.trained.eval()(batch.input_ids, batch.attention_mask, batch.labels, None)
    reference = torch.cat([start_chosen, start_rejected])
    # Not bitwise: the loop scores by PersonalizedLM (inputs_embeds, shared-prompt KV cache, batches of 32 by
    # length), which sums in another order. Measured: at most 1.5e-5 (1-2 float32 ulps of sums down to -259;
    # without shared prompts 3.1e-5). 1e-4 is a few ulps; the adapters moved the same log-probs by up to 0.35.
    torch.testing.assert_close(direct, reference, rtol=0, atol=1e-4)
    # not vacuous: with the adapters on, the trained policy scores the same pairs differently
    assert (policy - reference).abs().max() > 1e-2


def test_only_the_rows_of_batch_users_moved(watched):
    cfg, registry = watched.loaded.config, watched.loaded.registry
    # The loop's batch order (no group_by_length): epoch 0 of its sampler; 2 steps of 2 pairs stay inside it.
    sampler = EpochBatchSampler(len(watched.pairs), cfg.batch_size, cfg.seed)
    batches = list(sampler)[:cfg.max_steps * cfg.grad_accum]
    assert not cfg.group_by_length and cfg.max_steps * cfg.grad_accum < len(sampler)
    batch_users = {watched.pairs[i].user_id for batch in batches for i in batch}
    absent = set(registry.user_ids) - batch_users
    assert batch_users and len(absent) >= 2

    start, end = watched.start["rows"], user_rows(watched.loaded.model)
    # Rows are sparse nn.Embedding tables and RowSparseAdamW is a lazy AdamW: a step reads and writes (and
    # decays) only the rows in its sparse gradient, and clip_grad_norm_ scales only those; a user in no batch
    # never has a row there, so its row is never written. Row 0 (the generic user) is in every sparse gradient
    # through the generic copies (alpha < 1), but with zero values (forward masks it): zero update, decay of 0.
    assert torch.equal(start[0], torch.zeros_like(start[0])) and torch.equal(end[0], start[0])
    moved = {u for u in registry.user_ids if not torch.equal(end[registry.index(u)], start[registry.index(u)])}
    assert moved == batch_users, f"moved {sorted(moved)}, in a batch {sorted(batch_users)}"
