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
from collections.abc import Sequence

import torch

from prlhf.data.schema import PreferenceRecord
from prlhf.users.registry import UserRegistry


def _key(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def covote_factors(records: Sequence[PreferenceRecord], registry: UserRegistry, rank: int,
                   seed: int = 0) -> torch.Tensor:
    """(N+1, rank) factors, each column scaled to unit RMS over the users; row 0 (the generic user) is 0, and so
    is every row of a user whose responses nobody else judged. Columns past the matrix's rank are 0."""
    items: dict[tuple[str, str], int] = {}
    votes: dict[tuple[int, int], float] = {}
    for rec in records:
        user, prompt = registry.index(rec.user_id), _key(rec.prompt)
        for response, sign in ((rec.chosen, 1.0), (rec.rejected, -1.0)):
            item = items.setdefault((prompt, _key(response)), len(items))
            votes[user, item] = votes.get((user, item), 0.0) + sign
    n_users = len(registry) + 1
    factors = torch.zeros(n_users, rank)
    if not votes:
        return factors
    cells = torch.tensor(list(votes), dtype=torch.long)  # (nnz, 2): user, item
    values = torch.tensor(list(votes.values()), dtype=torch.float64).sign()  # a user's net verdict on a response
    counts = torch.zeros(len(items), dtype=torch.float64).index_add_(0, cells[:, 1], torch.ones_like(values))
    sums = torch.zeros(len(items), dtype=torch.float64).index_add_(0, cells[:, 1], values)
    values = values - (sums / counts)[cells[:, 1]]  # centred over the users who judged each response
    keep = values != 0
    if not keep.any():
        return factors
    matrix = torch.sparse_coo_tensor(cells[keep].T, values[keep], (n_users, len(items)),
                                     check_invariants=True).coalesce()
    q = min(rank, n_users, len(items))
    with torch.random.fork_rng(devices=[]):  # svd_lowrank's random projection; the caller's RNG stays as it was
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(matrix, q=q, niter=8)
    f = (u * s).float()  # (N+1, q)
    f[0] = 0.0
    rms = f[1:].pow(2).mean(0).sqrt()
    factors[:, :q] = torch.where(rms > 1e-8, f / rms.clamp_min(1e-8), torch.zeros_like(f))
    return factors


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
