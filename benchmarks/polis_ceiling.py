"""How much can knowing the participant add on Polis, from the very pairs the LM benchmark trains on?

`prlhf bench polis` asks whether a per-participant user model beats vanilla DPO (the consensus) by >= 0.03 on
held-out pairs. This script measures what the *pairs themselves* allow, without a language model: a
Bradley-Terry model over statement ids (each statement a learned score and a learned vector), fitted on the same
training pairs (`build_polis_task`, the bench's caps) and scored on the same held-out pairs:

- consensus:  s(x) = b_x                      (what vanilla DPO can at best learn: one ranking for everyone)
- groups:     s_u(x) = b_x + w_g(u) . q_x     (Polis's own opinion group as the user: the opinion-group baseline)
- individual: s_u(x) = b_x + p_u . q_x        (one vector per participant: the individual user model)

Only the `votes` split makes sense here: on the content-disjoint `statements` split no held-out statement has an
id seen in training, so an id model is at chance there and only a model reading the text can do anything.
Rank and L2 weight are chosen on `--split validation` (statements carved out of training), then the chosen
setting is scored on the test split. Prints a table and writes results.json and report.md.

    python benchmarks/polis_ceiling.py --out benchmarks/results/polis_ceiling
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from prlhf.data.tasks import build_polis_task
from script_results import measure_into_out

CONVERSATION = "american-assembly.bowling-green"
RANKS = (2, 8)
L2 = (0.01, 0.1, 1.0, 10.0, 100.0)
STEPS = 300
NEW_USER_PAIRS = 10  # the bench's new participants' pairs
OUTPUTS = ("results.json", "report.md")


def descend(pairs: torch.Tensor, b: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor | None,
            trained: list[torch.Tensor], l2: float) -> None:
    """Full-batch Adam on the pairwise logistic loss of s_u(x) = b_x (+ p_u . q_x), plus l2 * |trained|^2 per
    pair; moves the tensors in `trained` (the others stay as they are)."""
    opt = torch.optim.Adam(trained, lr=0.05)
    u, c, r = pairs.unbind(1)
    for _ in range(STEPS):
        margin = b[c] - b[r]
        if p is not None:
            margin = margin + (p[u] * (q[c] - q[r])).sum(-1)
        loss = torch.nn.functional.softplus(-margin).mean() + l2 * sum((t ** 2).sum() for t in trained) / len(pairs)
        opt.zero_grad()
        loss.backward()
        opt.step()


def fit(train: torch.Tensor, n_users: int, n_items: int, kind: str, rank: int, l2: float, seed: int):
    """Every parameter fitted on the training pairs; returns (b, (q, p)), or (b, None) for the consensus."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.zeros(n_items, requires_grad=True)
    q = (0.1 * torch.randn(n_items, rank, generator=gen)).requires_grad_(kind != "consensus")
    p = (0.1 * torch.randn(n_users, rank, generator=gen)).requires_grad_(kind != "consensus")
    if kind == "consensus":
        descend(train, b, None, None, [b], l2)
        return b.detach(), None
    descend(train, b, q, p, [b, q, p], l2)
    return b.detach(), (q.detach(), p.detach())


def fit_new_users(model, pairs: torch.Tensor, n_new: int, l2: float, seed: int) -> torch.Tensor:
    """(n_new, rank) vectors of new participants fitted on their pairs with every statement's score and vector
    frozen (the analogue of `prlhf adapt`: the LM and the known users stay as trained)."""
    b, (q, _) = model
    gen = torch.Generator().manual_seed(seed)
    p = (0.1 * torch.randn(n_new, q.shape[1], generator=gen)).requires_grad_(True)
    descend(pairs, b, q, p, [p], l2)
    return p.detach()


def accuracy(model, test: torch.Tensor, users_of_test: list[str], known: int) -> dict[str, float]:
    """Per-participant mean accuracy on their held-out pairs (ties count half; unknown users use p = 0)."""
    b, qp = model
    u, c, r = test.unbind(1)
    n_items = int(test[:, 1:].max()) + 1

    def pad(t: torch.Tensor) -> torch.Tensor:  # statements no training pair holds: score 0, vector 0
        return torch.cat([t, t.new_zeros(max(0, n_items - len(t)), *t.shape[1:])])

    b = pad(b)
    margin = b[c] - b[r]
    if qp is not None:
        q, p = pad(qp[0]), qp[1]
        pu = torch.where((u < known)[:, None], p[u.clamp(max=known - 1)], torch.zeros_like(p[:1]))
        margin = margin + (pu * (q[c] - q[r])).sum(-1)
    right = (margin > 0).float() + 0.5 * (margin == 0).float()
    per: dict[str, list[float]] = {}
    for name, hit in zip(users_of_test, right.tolist()):
        per.setdefault(name, []).append(hit)
    return {name: statistics.mean(hits) for name, hits in per.items()}


def new_participants(task, model, items: dict[str, int], l2: float, seed: int) -> dict:
    """Unseen participants with NEW_USER_PAIRS adaptation pairs: fitted from those pairs, scored on their held-out
    pairs, against the same participants with p = 0 (the consensus, i.e. the generic user)."""
    adapt = {}
    for r in task.extra["adapt"]:
        adapt.setdefault(r.user_id, []).append(r)
    new = sorted(u for u, rs in adapt.items() if len(rs) >= NEW_USER_PAIRS)
    index = {u: i for i, u in enumerate(new)}
    trained = len(model[0])  # statements in some training pair; only those have a score and a vector
    known_items = [r for u in new for r in adapt[u][:NEW_USER_PAIRS]
                   if items.get(r.chosen, trained) < trained and items.get(r.rejected, trained) < trained]
    pairs = torch.tensor([(index[r.user_id], items[r.chosen], items[r.rejected]) for r in known_items])
    held = [r for r in task.test if r.user_id in index]
    rows = torch.tensor([(index[r.user_id], items[r.chosen], items[r.rejected]) for r in held])
    fitted = fit_new_users(model, pairs, len(new), l2, seed)
    users = [r.user_id for r in held]
    after = accuracy((model[0], (model[1][0], fitted)), rows, users, len(new))
    before = accuracy((model[0], None), rows, users, len(new))
    return {"n_users": len(new), "k": NEW_USER_PAIRS, "mean_generic": statistics.mean(before.values()),
            "mean_fitted": statistics.mean(after.values())}


def run(split: str, args, kinds_settings=None) -> dict:
    # adapt_pairs_per_user as `prlhf bench polis` builds it, so that both draw the same pairs
    task = build_polis_task(conversations=[CONVERSATION], train_pairs_per_user=args.train_pairs_per_user,
                            test_pairs_per_user=args.test_pairs_per_user, split=split, held_out="votes",
                            adapt_pairs_per_user=max(NEW_USER_PAIRS, args.train_pairs_per_user), seed=args.seed)
    group_of = {u: f"group-{i['group']}" for u, i in task.users.items()}
    seen = {u for u, i in task.users.items() if i["seen"]}
    out, new = {}, None
    for kind in ("consensus", "groups", "individual"):
        users: dict[str, int] = {}
        items: dict[str, int] = {}
        name = (lambda uid: group_of[uid]) if kind == "groups" else (lambda uid: uid)
        train_rows = [(users.setdefault(name(r.user_id), len(users)), items.setdefault(r.chosen, len(items)),
                       items.setdefault(r.rejected, len(items))) for r in task.train]
        known, n_train_items = len(users), len(items)
        test_rows, test_users = [], []
        for r in task.test:
            uid = name(r.user_id) if r.user_id in seen else None
            test_rows.append((users[uid] if uid in users else known, items.setdefault(r.chosen, len(items)),
                              items.setdefault(r.rejected, len(items))))
            test_users.append(r.user_id)
        train, test = torch.tensor(train_rows), torch.tensor(test_rows)
        settings = [(1, 0.0)] if kind == "consensus" else [(k, l2) for k in RANKS for l2 in L2]
        if kinds_settings is not None:
            settings = [kinds_settings[kind]]
        best = None
        for rank, l2 in settings:
            model = fit(train, known, n_train_items, kind, rank, l2, args.seed)
            per = accuracy(model, test, test_users, known)
            seen_mean = statistics.mean(v for k, v in per.items() if k in seen)
            unseen = [v for k, v in per.items() if k not in seen]
            row = {"rank": rank, "l2": l2, "seen_mean": seen_mean,
                   "unseen_mean": statistics.mean(unseen) if unseen else None, "per_user": per}
            if best is None or seen_mean > best["seen_mean"]:
                best, best_model = row, model
        out[kind] = best
        if kind == "individual":
            new = new_participants(task, best_model, items, best["l2"], args.seed)
    return {"split": split, "n_train_pairs": len(task.train), "n_test_pairs": len(task.test),
            "n_seen": len(seen), "methods": out, "new_participants": new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--caps", default="8,32", help="training pairs per participant to try (the bench: 8)")
    parser.add_argument("--test-pairs-per-user", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    measure_into_out(parser, args, "polis_ceiling", OUTPUTS, measure)


def measure(args) -> tuple[dict, list[str]]:
    """Each cap's validation choice and test scores (per-participant lists dropped), and the report's lines."""
    started = time.time()
    results = {}
    for cap in (int(c) for c in args.caps.split(",")):
        args.train_pairs_per_user = cap
        val = run("validation", args)
        chosen = {k: (m["rank"], m["l2"]) for k, m in val["methods"].items()}
        test = run("test", args, chosen)
        results[cap] = {"validation": val, "test": test, "chosen": chosen}
    lines = ["# Polis: what the training pairs allow without a language model", "",
             f"Command: `python benchmarks/polis_ceiling.py {' '.join(sys.argv[1:])}` ({time.time() - started:.0f} s)",
             "", f"Conversation `{CONVERSATION}`, split `votes` (held-out pairs on statements the participant did not "
             "vote on in training), seed " f"{args.seed}. Bradley-Terry models over statement ids; rank and L2 weight "
             "chosen on the validation split, then scored once on the test split.", "",
             "| training pairs per participant | consensus | opinion groups | individual | individual - consensus "
             f"| unseen (individual model) | new participants: generic / fitted from {NEW_USER_PAIRS} pairs |",
             "|---|---|---|---|---|---|---|"]
    for cap, res in results.items():
        m, new = res["test"]["methods"], res["test"]["new_participants"]
        ind, gain = m["individual"], m["individual"]["seen_mean"] - m["consensus"]["seen_mean"]
        lines.append(f"| {cap} | {m['consensus']['seen_mean']:.3f} | {m['groups']['seen_mean']:.3f} "
                     f"(rank {m['groups']['rank']}) | {ind['seen_mean']:.3f} (rank {ind['rank']}, L2 {ind['l2']:g}) "
                     f"| {gain:+.3f} | {ind['unseen_mean']:.3f} | {new['mean_generic']:.3f} / "
                     f"{new['mean_fitted']:.3f} ({new['n_users']} participants) |")
    for res in results.values():
        for part in ("validation", "test"):
            for m in res[part]["methods"].values():
                m.pop("per_user")
    return results, lines


if __name__ == "__main__":
    main()
