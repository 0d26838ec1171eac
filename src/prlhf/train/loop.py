"""The P-DPO training loop, written out plainly on Accelerate: forward, loss, backward, step, log, checkpoint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from prlhf.config import TrainConfig
from prlhf.data.collate import IGNORE_INDEX, PairBatch, PairCollator, pair_length
from prlhf.data.loading import load_records
from prlhf.data.tokenize import adds_bos
from prlhf.losses import chosen_nll, p_dpo_loss, p_rm_loss
from prlhf.model.loading import add_lora, disable_dropout, enable_activation_checkpointing, input_embeddings_as_seen
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.prompt_sharing import RowLayout
from prlhf.model.reward import PersonalizedRewardModel
from prlhf.progress import bar_disabled
from prlhf.runs.directory import save_run
from prlhf.train.batching import EpochBatchSampler
from prlhf.train.checkpoint import Trainable, list_checkpoints, load_latest_checkpoint, save_checkpoint
from prlhf.train.distributed import allow_precision_change, cpu_processes, start_accelerator
from prlhf.train.metrics import TrainMetrics, tracker_names, truncate_log
from prlhf.train.optim import clip_grad_norm_
from prlhf.train.periodic_eval import PeriodicEval, load_eval_records
from prlhf.train.reference import cached_reference_logps, reference_cache_dir
from prlhf.train.run_start import check_run_dir, claim_run_dir, is_main_rank, train_fingerprint
from prlhf.train.setup import build_optimizer, prepare_base
from prlhf.users.covotes import covote_factors
from prlhf.users.models import build_user_model
from prlhf.users.registry import UserRegistry

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the message is one line and names what was kept."""


def policy_logps(model, batch: PairBatch, with_user_tokens: bool, with_generic: bool):
    """One forward for chosen, rejected and (alpha < 1) their generic copies: (user_c, user_r, gen_c, gen_r)."""
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels  # (2B, L) chosen rows then rejected
    pairs = batch.layout  # the rows' structure on the host: the forward's prompt sharing needs no device sync
    if not with_user_tokens:
        layout = RowLayout.of_pairs(pairs, None) if pairs is not None else None
        chosen, rejected = model(ids, mask, labels, None, layout=layout).chunk(2)
        return chosen, rejected, None, None
    users = batch.user_idx.repeat(2)  # (2B,)
    row_users = list(pairs.users) * 2 if pairs is not None else None
    if with_generic:  # every pair a second time with the generic user e_0 (index 0)
        ids, mask, labels = ids.repeat(2, 1), mask.repeat(2, 1), labels.repeat(2, 1)
        users = torch.cat([users, torch.zeros_like(users)])
        row_users = row_users + [0] * len(row_users) if row_users is not None else None
    layout = RowLayout.of_pairs(pairs, row_users, copies=2 if with_generic else 1) if pairs is not None else None
    logps = model(ids, mask, labels, users, layout=layout)
    user_c, user_r, *generic = logps.chunk(4 if with_generic else 2)
    return (user_c, user_r, *generic) if with_generic else (user_c, user_r, None, None)


def train(config: TrainConfig, show_progress: bool = True) -> dict:
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir = Path(config.out)
    if is_main_rank():
        check_run_dir(run_dir, config.resume)
    records = load_records(config.data)  # validates everything before anything is written
    eval_splits = load_eval_records(config)
    fingerprint = train_fingerprint(config, records)
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    allow_precision_change(mixed)
    # before --out is created: a launch config this machine cannot run (FSDP without an accelerator) writes nothing
    accelerator = start_accelerator(cpu=cpu_processes(), mixed_precision=mixed,
                                    gradient_accumulation_steps=config.grad_accum,
                                    log_with=tracker_names(config.report_to) or None, project_dir=str(run_dir))
    # the main process holds the run's lock from here to the end (a second `prlhf train` on --out is refused)
    with claim_run_dir(config, fingerprint):
        return _train(config, accelerator, mixed, records, eval_splits, fingerprint, show_progress)


def _train(config: TrainConfig, accelerator, mixed: str, records, eval_splits, fingerprint: dict,
           show_progress: bool) -> dict:
    run_dir = Path(config.out)
    is_main, show = accelerator.is_main_process, show_progress and accelerator.is_main_process
    set_seed(config.seed)
    accelerator.wait_for_everyone()

    with accelerator.main_process_first():  # the main process warms up and saves the base; the others load it
        base, tokenizer, pairs = prepare_base(config, records, run_dir, is_main, show, accelerator.device)
    if config.disable_dropout and (n := disable_dropout(base)):
        logger.info("dropout off in %d layers of the base LM (disable_dropout)", n)
    registry = UserRegistry.from_records(records)
    factors = covote_factors(records, registry, config.covote_rank, config.seed) \
        if config.user_start == "covotes" else None
    user_model = build_user_model(config.user_model, len(registry), config.user_tokens, base.config.hidden_size,
                                  num_clusters=config.clusters, logit_std=config.cluster_logit_std,
                                  rank=config.user_rank, vector_std=config.lowrank_vector_std,
                                  init=config.user_init, seed=config.seed,
                                  input_embeddings=input_embeddings_as_seen(base), factors=factors)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(base)
    lm = add_lora(base, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules())
    is_rm = config.objective == "rm"
    if is_rm:
        model = PersonalizedRewardModel(lm, user_model, int(adds_bos(tokenizer)), base.config.hidden_size,
                                        pool=config.reward_pool)
    else:
        model = PersonalizedLM(lm, user_model, prefix_len=int(adds_bos(tokenizer)),
                               share_prompts=config.share_prompts and not config.gradient_checkpointing)
    model = model.to(accelerator.device)
    reference_start = time.time()
    if is_rm:  # a reward model has no reference
        ref_chosen = ref_rejected = torch.zeros(len(pairs))
    else:
        # Every process computes (or reads from the on-disk cache) the reference log-probs of all pairs: one
        # no-grad pass, cheap next to training; only the rows of its own batches are used. The main process
        # writes the cache.
        with accelerator.autocast():  # the same precision as the policy's forward passes
            ref_chosen, ref_rejected = cached_reference_logps(model, pairs, tokenizer.pad_token_id,
                                                              reference_cache_dir(config.reference_cache), mixed,
                                                              write=is_main, show_progress=show)  # (N,), (N,)

    reference_seconds = time.time() - reference_start
    with_users = user_model.num_tokens > 0
    alpha = config.alpha if with_users else 1.0  # uniform: l(e_u) = l(e_0), the split changes nothing
    # batch_size is per process: the prepared loader hands process p the batches p, p + P, p + 2P, ... of
    # the sampler, so one optimizer step sees P * batch_size * grad_accum pairs.
    lengths = [pair_length(p) for p in pairs] if config.group_by_length else None
    sampler = EpochBatchSampler(len(pairs), config.batch_size, config.seed, lengths=lengths,
                                group=accelerator.num_processes * config.grad_accum)
    # Its own generator: creating a loader iterator draws a base seed, which must not consume the global RNG
    # that dropout uses (or a resumed run would see different dropout masks).
    loader = DataLoader(list(range(len(pairs))), batch_sampler=sampler,
                        collate_fn=PairCollator(pairs, registry, tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(config.seed))
    optimizer = build_optimizer(model, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # loader: this process's batches
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = math.ceil(config.resolved_epochs() * steps_per_epoch)
    total_steps = min(total_steps, config.max_steps) if config.max_steps else total_steps
    # Not prepared: stepped by hand once per optimizer step (a prepared one steps once per process).
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer.optimizer, warmup, total_steps)
    trainable = Trainable(accelerator, model, optimizer, scheduler)
    ref_chosen, ref_rejected = ref_chosen.to(accelerator.device), ref_rejected.to(accelerator.device)
    evaluator = PeriodicEval(eval_splits, config, tokenizer, registry, run_dir / "eval.jsonl") \
        if eval_splits and is_main else None
    accelerator.init_trackers("prlhf", config=dataclasses.asdict(config))  # trackers live on the main process

    step, epoch, skip, metrics = 0, 0, 0, TrainMetrics(with_logps=not is_rm)
    log_path = run_dir / "metrics.jsonl"
    state = load_latest_checkpoint(trainable, run_dir) if config.resume else None
    if state:
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        metrics.load_state_dict(state.get("metrics", {"correct": {}, "total": {}}))
        if is_main:
            truncate_log(log_path, step)
            truncate_log(run_dir / "eval.jsonl", step)
        logger.info("resumed from step %d (epoch %d)", step, epoch)
    elif config.resume:  # from scratch: what a killed first attempt logged is logged again
        logger.info("--resume: no checkpoint in %s, starting from scratch", run_dir)
        if is_main:
            truncate_log(log_path, 0)
            truncate_log(run_dir / "eval.jsonl", 0)
    save_every = config.save_steps or steps_per_epoch
    desc = ("P-RM" if with_users else "RM") if is_rm else ("P-DPO" if with_users else "DPO")
    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=bar_disabled(show))
    start = time.time()
    model.train()
    while step < total_steps:
        loader.set_epoch(epoch)  # the prepared loader passes it to our sampler (and would override a direct call)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batches_in_epoch, batch in enumerate(epoch_loader, start=skip + 1):
            with accelerator.accumulate(model):
                user_c, user_r, gen_c, gen_r = policy_logps(model, batch, with_users, alpha < 1.0)
                idx = batch.example_idx
                if is_rm:  # user_c etc. are rewards here
                    out, generic = p_rm_loss(user_c, user_r, gen_c, gen_r, alpha=alpha)
                else:
                    out, generic = p_dpo_loss(user_c, user_r, gen_c, gen_r, ref_chosen[idx], ref_rejected[idx],
                                              beta=config.beta, alpha=alpha)
                loss = out.losses
                if config.nll_weight:
                    chosen_tokens = (batch.labels[:len(batch), 1:] != IGNORE_INDEX).sum(-1)  # (B,)
                    loss = loss + config.nll_weight * chosen_nll(user_c, chosen_tokens)
                accelerator.backward(loss.mean())
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.unscale_gradients()  # no-op unless fp16; our clip also handles sparse user rows
                    clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            metrics.update(out, user_c, user_r, generic, batch.user_idx)  # kept on the device until logged
            if not accelerator.sync_gradients:
                continue
            if not metrics.step_was_finite(accelerator):  # stop before a checkpoint or the files take NaN weights
                bar.close()  # the one-line error then starts a line of its own
                kept = list_checkpoints(run_dir)
                raise TrainingDiverged(
                    f"{run_dir}: the loss became NaN or infinite at step {step + 1} (learning rate "
                    f"{scheduler.get_last_lr()[0]:.3g}, mixed precision {config.mixed_precision}); nothing of this "
                    f"step was saved{f' (last checkpoint: {kept[-1][1].name})' if kept else ''}. "
                    "Lower --lr / --user-lr, or train in fp32 (--mixed-precision no)")
            scheduler.step()
            step += 1
            bar.update()
            if step % config.log_steps == 0 or step == total_steps:
                row = {"step": step, "epoch": epoch + batches_in_epoch / len(loader), **metrics.row(accelerator),
                       "lr": scheduler.get_last_lr()[0], "elapsed_s": time.time() - start}
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
                if is_main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            if eval_splits and ((config.eval_steps and step % config.eval_steps == 0) or step == total_steps):
                if evaluator is not None:  # the main process evaluates; the others wait for it
                    for row in evaluator(accelerator.unwrap_model(model), step):  # not under autocast
                        accelerator.log({f"eval/{row['split']}/{k}": v for k, v in row.items()
                                         if k not in ("step", "split") and v is not None}, step=step)
                accelerator.wait_for_everyone()
            if step % save_every == 0 or step == total_steps:
                metrics.flush(accelerator)  # its per-user counts go into the checkpoint
                save_checkpoint(trainable, run_dir, step, {"step": step, "epoch": epoch, "batches_in_epoch":
                                                           batches_in_epoch, "metrics": metrics.state_dict(),
                                                           "fingerprint": fingerprint},
                                config.keep_checkpoints)
            if step >= total_steps:
                break
        else:
            epoch, skip = epoch + 1, 0
            metrics.new_epoch(accelerator)
            continue
        break
    bar.close()

    summary = {"steps": step, "train_seconds": round(time.time() - start, 2),
               "reference_seconds": round(reference_seconds, 2), "n_pairs": len(pairs),
               "n_users": len(registry), "user_model": config.user_model, "model": config.model,
               "objective": config.objective}
    accelerator.wait_for_everyone()
    if is_main:
        save_run(run_dir, accelerator.unwrap_model(model), tokenizer, registry, summary, config)  # one new version
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers (and the process group: no collectives after this)
    return summary
