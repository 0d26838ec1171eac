"""Users' co-votes: a data-driven start for the user model's rows.

Where the same responses are judged by many users (Polis statements, persona statements), users who prefer the
same responses should start out alike. Each user's training comparisons give a row of a users x responses matrix
(+1 where they chose a response more often than they rejected it, -1 the other way); each response's column is
centred over the users who judged it (so a response everyone likes says nothing about anyone), and the leading
singular vectors of that matrix are the users' co-vote factors, like Polis's own PCA of its vote matrix. A user
model seeds its rows from them (`build_user_model(..., factors=...)`); training then moves the rows as usual.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from prlhf.data.schema import PreferenceRecord
from prlhf.users.registry import UserRegistry


def _key(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _verdicts(records: Iterable[PreferenceRecord]) -> dict[str, dict[tuple[str, str], float]]:
    """user_id -> {(prompt, response): +1 | -1}, the sign of (times chosen - times rejected), responses in the
    order the records first name them; ties dropped."""
    net: dict[str, dict[tuple[str, str], float]] = {}
    for rec in records:
        mine = net.setdefault(rec.user_id, {})
        prompt = _key(rec.prompt)
        for response, sign in ((rec.chosen, 1.0), (rec.rejected, -1.0)):
            item = (prompt, _key(response))
            mine[item] = mine.get(item, 0.0) + sign
    return {u: {i: (1.0 if v > 0 else -1.0) for i, v in mine.items() if v != 0} for u, mine in net.items()}


@dataclass
class CovoteBasis:
    """The training records' co-vote factors and what folds a new user's votes into them."""

    factors: torch.Tensor  # (N+1, rank): row 0 (the generic user) and users with no shared responses are 0
    items: dict[tuple[str, str], int]  # (prompt, response) -> column
    means: torch.Tensor  # (items,) each column's mean verdict over the users who judged it
    loadings: torch.Tensor  # (items, rank): centred verdicts @ loadings = factors (for seen users, up to the SVD's
    # approximation)

    def fold_in(self, records: Sequence[PreferenceRecord], user_ids: Sequence[str]) -> torch.Tensor:
        """(len(user_ids), rank) factors of users outside the matrix from their own records (the usual SVD fold-in,
        on the responses they share with the training users); 0 for a user with none."""
        out = torch.zeros(len(user_ids), self.factors.shape[1])
        verdicts = _verdicts(records)
        for row, uid in enumerate(user_ids):
            cols = [(self.items[i], v) for i, v in verdicts.get(uid, {}).items() if i in self.items]
            if cols:
                idx = torch.tensor([c for c, _ in cols])
                centred = torch.tensor([v for _, v in cols], dtype=torch.float64) - self.means[idx]
                out[row] = (centred @ self.loadings[idx]).float()
        return out


def covote_basis(records: Sequence[PreferenceRecord], registry: UserRegistry, rank: int,
                 seed: int = 0) -> CovoteBasis:
    """The users x responses matrix of `records` (users in `registry`), centred per response, and its leading
    `rank` factors: each column scaled to unit RMS over the users, columns past the matrix's rank 0."""
    records = [r for r in records if r.user_id in registry]
    items: dict[tuple[str, str], int] = {}  # numbered in the records' order: it fixes the SVD's random projection
    for rec in records:
        for response in (rec.chosen, rec.rejected):
            items.setdefault((_key(rec.prompt), _key(response)), len(items))
    cells_list, values_list = [], []
    for uid, mine in _verdicts(records).items():
        for item, v in mine.items():
            cells_list.append((registry.index(uid), items[item]))
            values_list.append(v)
    n_users = len(registry) + 1
    factors, loadings = torch.zeros(n_users, rank), torch.zeros(len(items), rank, dtype=torch.float64)
    means = torch.zeros(len(items), dtype=torch.float64)
    if not cells_list:
        return CovoteBasis(factors, items, means, loadings)
    cells = torch.tensor(cells_list, dtype=torch.long)  # (nnz, 2): user, item
    values = torch.tensor(values_list, dtype=torch.float64)  # a user's net verdict on a response
    counts = torch.zeros(len(items), dtype=torch.float64).index_add_(0, cells[:, 1], torch.ones_like(values))
    means = torch.zeros(len(items), dtype=torch.float64).index_add_(0, cells[:, 1], values) / counts
    values = values - means[cells[:, 1]]  # centred over the users who judged each response
    keep = values != 0
    if not keep.any():
        return CovoteBasis(factors, items, means, loadings)
    matrix = torch.sparse_coo_tensor(cells[keep].T, values[keep], (n_users, len(items)),
                                     check_invariants=True).coalesce()
    q = min(rank, n_users, len(items))
    with torch.random.fork_rng(devices=[]):  # svd_lowrank's random projection; the caller's RNG stays as it was
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=8)
    f = (u * s).float()  # (N+1, q), about matrix @ v
    f[0] = 0.0
    rms = f[1:].pow(2).mean(0).sqrt()
    ok = rms > 1e-8
    factors[:, :q] = torch.where(ok, f / rms.clamp_min(1e-8), torch.zeros_like(f))
    loadings[:, :q] = torch.where(ok, v / rms.clamp_min(1e-8).double(), torch.zeros_like(v))
    return CovoteBasis(factors, items, means, loadings)


def covote_factors(records: Sequence[PreferenceRecord], registry: UserRegistry, rank: int,
                   seed: int = 0) -> torch.Tensor:
    """(N+1, rank) co-vote factors of the users in `registry` (see `covote_basis`)."""
    return covote_basis(records, registry, rank, seed).factors


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """(n, r) points -> (n,) cluster of each point: Lloyd's algorithm from a k-means++ start."""
    n = points.shape[0]
    k = min(k, n)
    centres = points[torch.randint(0, n, (1,), generator=generator)]
    while centres.shape[0] < k:
        d2 = torch.cdist(points, centres).min(1).values.pow(2)
        if d2.sum() <= 0:
            break
        centres = torch.cat([centres, points[torch.multinomial(d2, 1, generator=generator)]])
    assign = torch.cdist(points, centres).argmin(1)
    for _ in range(iters):
        for j in range(centres.shape[0]):
            members = points[assign == j]
            if len(members):
                centres[j] = members.mean(0)
        new = torch.cdist(points, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def rows_from_votes(basis: CovoteBasis, registry: UserRegistry, rows: torch.Tensor,
                    known_records: Sequence[PreferenceRecord], new_records: Sequence[PreferenceRecord],
                    new_ids: Sequence[str], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Start rows for users outside a trained user model from a few of their votes.

    For a new user with k records, a linear map from co-vote factors to the trained (N+1, R) `rows` is fitted
    over the known users, each folded in from k of their own training records, so the map already shrinks a
    factor read off k votes as far as such factors deserve. Returns ((n, R) rows, (n,) bool: the user shares a
    response with the known users; the others get a zero row, for the caller to replace by the generic one)."""
    mine: dict[str, list[PreferenceRecord]] = defaultdict(list)
    for rec in new_records:
        mine[rec.user_id].append(rec)
    f = basis.fold_in(new_records, new_ids)  # (n, rank)
    has = f.abs().sum(1) > 0
    out = torch.zeros(len(new_ids), rows.shape[1])
    theirs: dict[str, list[PreferenceRecord]] = defaultdict(list)
    for rec in known_records:
        if rec.user_id in registry:
            theirs[rec.user_id].append(rec)
    known = [u for u in sorted(theirs) if basis.factors[registry.index(u)].abs().sum() > 0]
    if len(known) <= f.shape[1] + 1:  # too few to fit a map
        return out, torch.zeros_like(has)
    y = rows[torch.tensor([registry.index(u) for u in known], dtype=torch.long)].double()  # (n_known, R)
    by_k: dict[int, list[int]] = defaultdict(list)
    for i, uid in enumerate(new_ids):
        if has[i]:
            by_k[len(mine[uid])].append(i)
    for k, members in sorted(by_k.items()):
        rng = random.Random(f"{seed}:covote-rows:{k}")
        sampled = [r for u in known for r in rng.sample(theirs[u], min(k, len(theirs[u])))]
        x = torch.cat([torch.ones(len(known), 1), basis.fold_in(sampled, known)], 1).double()  # (n_known, 1+rank)
        # gelsd (SVD): a factor that is 0 for everyone makes x rank-deficient, and the default QR driver then
        # returned a zero slope on some hosts
        coef = torch.linalg.lstsq(x, y, driver="gelsd").solution  # (1+rank, R)
        idx = torch.tensor(members)
        out[idx] = (torch.cat([torch.ones(len(idx), 1), f[idx]], 1).double() @ coef).to(out.dtype)
    return out, has
