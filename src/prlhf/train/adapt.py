"""Few-shot fitting of new users on a finished run (P-RLHF.md §2, "few-shot fitting of a new user's vector").

Only the new users' own rows are trained (the user-model kind says which tensor is a user's row and what it
means: o_i of the individual model, w_i of the cluster model, v_i of the low-rank one), starting from the kind's
generic row (the generic user e_0) or a warm start. The LM, its adapters, the shared user-model parameters and
every known user are frozen. The loss is P-DPO with alpha = 1, i.e. DPO
with the user's embedding, against the reference (base, adapters off, no user tokens) computed once:

    l_i = -log sigmoid(beta * [(log pi(y_w|x,e_i) - log pi_ref(y_w|x)) - (log pi(y_l|x,e_i) - log pi_ref(y_l|x))])

Each user's rows only see that user's pairs and AdamW is element-wise without weight decay, so fitting all new
users in one batch (loss = sum over users of their mean loss) is the same as fitting them one by one.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from prlhf.config import ADAPT_LR_FACTOR, DEFAULT_STEPS, WARM_STARTS, ConfigError, TrainConfig
from prlhf.data.collate import collate_pairs
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import EncodedPair
from prlhf.losses import dpo_loss
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.scoring import compute_reference_logps, implicit_reward_margins, per_user_accuracy
from prlhf.progress import bar_disabled
from prlhf.runs.directory import LoadedRun, RunError
from prlhf.runs.users import UserTable, extend_rows, require_personalized, table_from_module
from prlhf.train.loop import TrainingDiverged
from prlhf.users.covotes import covote_basis, rows_from_votes
from prlhf.users.models import RowsOverShared, user_model_class
from prlhf.users.registry import UserRegistry

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ warm start


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def jaccard(a: str, b: str) -> float:
    ta, tb = set(re.findall(r"\w+", a.lower())), set(re.findall(r"\w+", b.lower()))
    return len(ta & tb) / len(ta | tb) if ta | tb else 0.0


def user_texts(records: Sequence[PreferenceRecord]) -> dict[str, str]:
    """user_id -> the user's (first non-empty) user_text."""
    texts: dict[str, str] = {}
    for r in records:
        if r.user_text and r.user_id not in texts:
            texts[r.user_id] = r.user_text
    return texts


def text_neighbours(text: str, known: dict[str, str]) -> tuple[list[str], str]:
    """Known users with the same profile text (after normalising case/whitespace), or else those with the most
    similar one (token-set Jaccard; ties all kept). Returns (user ids, "exact" | "jaccard=0.xx" | "none")."""
    target = normalise_text(text)
    exact = [u for u, t in known.items() if normalise_text(t) == target]
    if exact:
        return exact, "exact"
    scores = {u: jaccard(text, t) for u, t in known.items()}
    best = max(scores.values(), default=0.0)
    if best <= 0.0:
        return [], "none"
    return [u for u, s in scores.items() if s == best], f"jaccard={best:.2f}"


def initial_rows(table: UserTable, new_ids: Sequence[str], warm_start: str, new_texts: dict[str, str],
                 known_texts: dict[str, str]) -> tuple[torch.Tensor, dict[str, str]]:
    """(n, row) initial rows and, per user, where the start came from."""
    module = table.to_module()
    generic = module.generic_row()
    rows, source = [], {}
    known = {u: t for u, t in known_texts.items() if u in table.registry}
    for uid in new_ids:
        found, how = ([], "none")
        if warm_start == "text" and uid in new_texts:
            found, how = text_neighbours(new_texts[uid], known)
        if found:
            rows.append(module.mean_row(table.rows[torch.tensor([table.registry.index(u) for u in found])].float()))
            source[uid] = f"text {how}: mean of {len(found)} user(s)"
        else:
            rows.append(generic.clone())
            source[uid] = "generic" if warm_start == "none" else "generic (no profile text match)"
    return torch.stack(rows), source


def covote_start(table: UserTable, new_ids: Sequence[str], fit_records: Sequence[PreferenceRecord],
                 known_records: Sequence[PreferenceRecord], config: TrainConfig) -> tuple[torch.Tensor, dict[str, str]]:
    """(n, row) initial rows predicted from each new user's votes on responses the known users judged (their
    co-vote factors, `prlhf.users.covotes.rows_from_votes`); the generic row where they share none."""
    basis = covote_basis(known_records, table.registry, config.covote_rank, config.seed)
    rows, has = rows_from_votes(basis, table.registry, table.rows.float(), known_records, fit_records, new_ids,
                                config.seed)
    generic = table.to_module().generic_row()
    rows[~has] = generic.to(rows.dtype)
    source = {u: "covotes" if h else "generic (no response shared with the known users)"
              for u, h in zip(new_ids, has.tolist())}
    return rows, source


# --------------------------------------------------------------------------------------------------- fitting


def split_holdout(records: Sequence[PreferenceRecord], new_ids: Sequence[str], holdout: float,
                  seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Per new user, a seeded share `holdout` of their pairs goes to evaluation, the rest to fitting."""
    by_user = defaultdict(list)
    for r in records:
        by_user[r.user_id].append(r)
    fit, held = [], []
    for uid in new_ids:
        recs = by_user[uid]
        n_held = int(round(holdout * len(recs)))
        if holdout > 0 and len(recs) > 1:
            n_held = min(max(n_held, 1), len(recs) - 1)  # keep at least one pair on each side
        else:
            n_held = 0
        order = list(range(len(recs)))
        random.Random(f"{seed}:{uid}").shuffle(order)
        chosen = set(order[:n_held])  # both sides keep the data's order
        held += [r for i, r in enumerate(recs) if i in chosen]
        fit += [r for i, r in enumerate(recs) if i not in chosen]
    return fit, held


def fit_rows(model: PersonalizedLM, init_rows: torch.Tensor, pairs: Sequence[EncodedPair], local_idx: torch.Tensor,
             pad_id: int, beta: float, steps: int, lr: float, batch_pairs: int = 64,
             show_progress: bool = True, user_ids: Sequence[str] | None = None,
             reference_guard=None) -> tuple[torch.Tensor, list[float]]:
    """Train the new rows (n, row) on their users' pairs; returns the fitted rows and the loss per step.

    The reference pass turns the LM's adapters off: `reference_guard` (a context manager entered around it) keeps
    anyone else using the same LM meanwhile (a server decoding while it fits a user) from seeing that.
    Raises TrainingDiverged, naming the step and the users (`user_ids`, by local index), as soon as a loss or a
    row stops being finite: a NaN row must never reach a run directory."""
    with reference_guard or contextlib.nullcontext():
        ref_chosen, ref_rejected = compute_reference_logps(model, pairs, pad_id, show_progress=False)  # (P,), (P,)
    for p in model.parameters():  # PEFT's disable_adapter() marks the adapters trainable again on exit
        p.requires_grad_(False)
    new = RowsOverShared(model.user_model, init_rows.float())
    fitter = PersonalizedLM(model.lm, new, model.prefix_len).eval()  # eval: no dropout in the frozen LM
    counts = torch.bincount(local_idx, minlength=init_rows.shape[0]).float()
    weights = 1.0 / counts[local_idx]  # (P,): each user's mean loss, summed over users
    order = list(range(len(pairs)))
    batches = [collate_pairs([pairs[i] for i in chunk], local_idx[chunk], torch.tensor(chunk), pad_id)
               for chunk in (order[s:s + batch_pairs] for s in range(0, len(order), batch_pairs))]
    optimizer = torch.optim.AdamW([new.rows], lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc="adapt users", disable=bar_disabled(show_progress))
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        diverged = torch.zeros(init_rows.shape[0], dtype=torch.bool)  # (n,) users with a non-finite loss
        for batch in batches:
            logps = fitter(batch.input_ids, batch.attention_mask, batch.labels, batch.user_idx.repeat(2))  # (2B,)
            chosen, rejected = logps.chunk(2)
            idx = batch.example_idx
            out = dpo_loss(chosen, rejected, ref_chosen[idx], ref_rejected[idx], beta)
            loss = (out.losses * weights[idx]).sum()
            loss.backward()
            total += loss.item()
            diverged[batch.user_idx[~torch.isfinite(out.losses.detach())]] = True
        optimizer.step()
        diverged |= ~torch.isfinite(new.rows.detach()).all(dim=1)
        if diverged.any():  # the same guard as training's (TrainingDiverged): stop before anything is kept
            bar.close()
            bad = [user_ids[i] if user_ids else f"#{i}" for i in diverged.nonzero().flatten().tolist()]
            shown = ", ".join(repr(u) for u in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise TrainingDiverged(f"adapt: the loss or row of user(s) {shown} became NaN or infinite at step "
                                   f"{step + 1} of {steps} (lr {lr:.3g}); nothing was written. Lower --lr")
        losses.append(total / init_rows.shape[0])
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return new.rows.detach().clone(), losses


def _accuracy_by_user(model: PersonalizedLM, records: Sequence[PreferenceRecord], pairs: Sequence[EncodedPair],
                      registry: UserRegistry, pad_id: int) -> dict[str, float]:
    margins = implicit_reward_margins(model, pairs, registry, pad_id)
    return {u: v["accuracy"] for u, v in per_user_accuracy(records, margins, registry)["per_user"].items()}


def default_adapt_lr(config: TrainConfig, kind: str) -> float:
    """ADAPT_LR_FACTOR x the rate the run trained its users' own rows with: user_code_lr for rows that are codes
    (the cluster model's mixing logits, the low-rank model's vectors), user_lr for soft-token offsets."""
    codes = user_model_class(kind).rows_are_codes
    trained = config.resolved_user_code_lr() if codes else config.resolved_user_lr()
    return ADAPT_LR_FACTOR * trained


def adapt_users(run: LoadedRun, records: Sequence[PreferenceRecord], *, steps: int = DEFAULT_STEPS,
                lr: float | None = None, holdout: float = 0.0, seed: int = 0, user: str | None = None,
                warm_start: str = "none", known_records: Sequence[PreferenceRecord] | None = None,
                eval_records: Sequence[PreferenceRecord] | None = None, batch_pairs: int = 64,
                show_progress: bool = True, reference_guard=None) -> tuple[LoadedRun, dict]:
    """Fit embeddings for the users in `records` that the run does not know (or only `user`).

    `holdout` of each new user's pairs (seeded) is kept out of fitting and used for the before (generic
    embedding) / after (adapted) accuracy; `eval_records` gives that evaluation set explicitly instead.
    `warm_start="text"` starts each new user from the mean embedding of known users with the same (or else the
    most similar) user_text; `"covotes"` from the row their votes predict (`covote_start`); both read the known
    users from `known_records` (their training data).
    `steps=0` keeps the warm start's rows as they are (a closed-form onboarding: no gradient step).
    `lr` defaults to `default_adapt_lr` of the run; `reference_guard`: see `fit_rows`.
    Returns a new LoadedRun (sharing `run`'s LM; user model and registry extended, known rows bitwise equal,
    nothing written to disk) and a report dict.
    """
    if steps < 0 or (lr is not None and lr <= 0):
        raise ConfigError("adapt: need steps >= 0 and lr > 0")
    if steps == 0 and warm_start == "none":
        raise ConfigError("adapt: steps 0 keeps each new user where the warm start puts them; without one "
                          "(--warm-start text or covotes) that is the generic user: give steps >= 1")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"adapt: holdout must be in [0, 1), got {holdout}")
    if warm_start not in WARM_STARTS:
        raise ConfigError(f"adapt: warm_start must be one of {', '.join(WARM_STARTS)}, got {warm_start!r}")
    if getattr(run.model, "is_reward_model", False):
        raise ConfigError("adapt: reward-model runs are not supported yet (adapt a P-DPO run)")
    kind = run.model.user_model.kind
    try:
        require_personalized(kind, "adapt")
    except RunError as exc:
        raise RunError(f"{exc}; train an individual, cluster or lowrank run to adapt new users") from None
    lr = lr or default_adapt_lr(run.config, kind)
    if warm_start != "none" and known_records is None:
        raise ConfigError(f"adapt: --warm-start {warm_start} needs the known users' training data (--known-data "
                          "TRAIN_FILE): their profile texts or votes")
    new_ids = sorted({r.user_id for r in records if r.user_id not in run.registry})
    if user is not None:
        if user in run.registry:
            raise RunError(f"adapt: user {user!r} is already in the run; delete it first to refit it")
        if user not in new_ids:
            raise ConfigError(f"adapt: user {user!r} has no pairs in the data")
        new_ids = [user]
    if not new_ids:
        raise ConfigError("adapt: every user in the data is already known to the run; nothing to adapt")
    records = [r for r in records if r.user_id in set(new_ids)]
    if eval_records is None:
        fit_records, held = split_holdout(records, new_ids, holdout, seed)
    else:
        fit_records, held = list(records), [r for r in eval_records if r.user_id in set(new_ids)]

    cfg, tok = run.config, run.tokenizer
    pad_id = tok.pad_token_id
    table = table_from_module(run.model.user_model, run.registry)
    started = time.time()  # the warm start is part of the fit's cost (with steps 0, all of it)
    if warm_start == "covotes":
        init, init_source = covote_start(table, new_ids, fit_records, known_records, cfg)
    else:
        init, init_source = initial_rows(table, new_ids, warm_start, user_texts(records),
                                         user_texts(known_records or []))
    start_seconds = time.time() - started
    local = {u: i for i, u in enumerate(new_ids)}
    pairs = run.encode(fit_records)
    local_idx = torch.tensor([local[r.user_id] for r in fit_records], dtype=torch.long)

    # Frozen: no parameter of the run gets a gradient; only the new rows (a fresh Parameter) do.
    flags = {p: p.requires_grad for p in run.model.parameters()}
    was_training = run.model.training
    run.model.eval()
    try:
        start = time.time()
        rows, losses = (init.float(), []) if steps == 0 else \
            fit_rows(run.model, init, pairs, local_idx, pad_id, cfg.beta, steps, lr, batch_pairs, show_progress,
                     user_ids=new_ids, reference_guard=reference_guard)
        seconds = time.time() - start + start_seconds
        new_table = extend_rows(table, new_ids, rows)
        model = PersonalizedLM(run.model.lm, new_table.to_module(), run.model.prefix_len).eval()
        before, start_acc, after = {}, {}, {}
        if held:
            held_pairs = run.encode(held)
            before = _accuracy_by_user(run.model, held, held_pairs, run.registry, pad_id)  # generic e_0
            start_acc = before
            if warm_start != "none":
                init_model = PersonalizedLM(run.model.lm, extend_rows(table, new_ids, init).to_module(),
                                            run.model.prefix_len).eval()
                start_acc = _accuracy_by_user(init_model, held, held_pairs, new_table.registry, pad_id)
            after = _accuracy_by_user(model, held, held_pairs, new_table.registry, pad_id)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        run.model.train(was_training)
    new_run = LoadedRun(model, tok, new_table.registry, cfg, run.path)

    report = {"user_model": kind, "steps": steps, "lr": lr, "holdout": holdout, "seed": seed,
              "warm_start": warm_start, "fit_seconds": round(seconds, 3),
              "seconds_per_user": round(seconds / len(new_ids), 3), "initial_loss": losses[0] if losses else None,
              "final_loss": losses[-1] if losses else None, "users": {}}
    fit_counts = defaultdict(int)
    for r in fit_records:
        fit_counts[r.user_id] += 1
    for uid in new_ids:
        report["users"][uid] = {"index": new_table.registry.index(uid), "n_fit": fit_counts[uid],
                                "n_eval": sum(r.user_id == uid for r in held), "init": init_source[uid],
                                "before": before.get(uid), "start": start_acc.get(uid),
                                "after": after.get(uid)}
    evaluated = [u for u in new_ids if u in after]
    if evaluated:
        report["mean_before"] = sum(before[u] for u in evaluated) / len(evaluated)
        report["mean_after"] = sum(after[u] for u in evaluated) / len(evaluated)
    return new_run, report
