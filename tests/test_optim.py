"""Optimizer semantics for user tables: only the users in a batch are read, moved and given optimizer state."""

import pytest
import torch
from torch import nn

from prlhf.train.optim import RowSparseAdamW, clip_grad_norm_
from prlhf.users.models import build_user_model


def test_dense_path_is_adamw():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a = RowSparseAdamW(a.parameters(), lr=0.1, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(4, 3)
    for _ in range(5):
        for layer, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            layer(x).pow(2).sum().backward()
            opt.step()
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_sparse_rows_seen_every_step_follow_adamw():
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    sparse, dense = nn.Embedding(5, 3, sparse=True, _weight=w.clone()), nn.Embedding(5, 3, _weight=w.clone())
    opt_s = RowSparseAdamW(sparse.parameters(), lr=0.1, weight_decay=0.01)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=0.1, weight_decay=0.01)
    idx = torch.arange(5)
    for _ in range(5):
        for emb, opt in ((sparse, opt_s), (dense, opt_d)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            opt.step()
    assert torch.allclose(sparse.weight, dense.weight, atol=1e-5)  # same maths, different op order


@pytest.mark.parametrize("kind", ["individual", "cluster", "lowrank"])
def test_users_outside_the_batch_are_bitwise_unchanged(kind):
    """User 2 trains at step 1, then sits out: AdamW would keep moving it by momentum; ours must not."""
    um = build_user_model(kind, 6, 2, 4, num_clusters=3, rank=2, init="uniform", sparse=True)
    opt = RowSparseAdamW(um.parameters(), lr=0.1, weight_decay=0.1)
    table = {"individual": "offsets", "cluster": "weights", "lowrank": "vectors"}[kind]
    for step, users in enumerate(([2, 3], [3, 4], [4, 5])):
        before = getattr(um, table).weight.detach().clone()
        opt.zero_grad()
        um(torch.tensor(users)).pow(2).sum().backward()
        grad = getattr(um, table).weight.grad
        assert grad.is_sparse and set(grad.coalesce().indices()[0].tolist()) == set(users)
        opt.step()
        after = getattr(um, table).weight.detach()
        untouched = [u for u in range(7) if u not in users]
        assert torch.equal(after[untouched], before[untouched]), f"step {step}: rows {untouched} moved"
        assert not torch.equal(after[users], before[users])
    state = opt.state[getattr(um, table).weight]
    assert state["row_step"].tolist() == [0, 0, 1, 2, 2, 1, 0]


def test_torch_adamw_would_move_absent_users():
    """Why the custom optimizer exists: with a dense table and AdamW, a user absent from the step still moves."""
    um = build_user_model("individual", 4, 2, 4, init="uniform", sparse=False)
    opt = torch.optim.AdamW(um.parameters(), lr=0.1, weight_decay=0.0)
    um(torch.tensor([2])).pow(2).sum().backward()
    opt.step()
    before = um.offsets.weight.detach().clone()
    opt.zero_grad()
    um(torch.tensor([3])).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(um.offsets.weight[2], before[2])


def test_clip_counts_sparse_and_dense_gradients():
    emb, lin = nn.Embedding(5, 3, sparse=True), nn.Linear(3, 1)
    (lin(emb(torch.tensor([1, 1, 2]))).sum() * 10).backward()
    expected = torch.sqrt(emb.weight.grad.to_dense().norm() ** 2 + sum(p.grad.norm() ** 2 for p in lin.parameters()))
    total = clip_grad_norm_(list(emb.parameters()) + list(lin.parameters()), 1.0)
    assert torch.allclose(total, expected)
    clipped = torch.sqrt(emb.weight.grad.to_dense().norm() ** 2 + sum(p.grad.norm() ** 2 for p in lin.parameters()))
    assert torch.allclose(clipped, torch.tensor(1.0), atol=1e-4)


def test_lowrank_user_model_shapes_and_generic():
    um = build_user_model("lowrank", 1000, 3, 8, rank=4, init="uniform")
    out = um(torch.tensor([0, 7, 999]))
    assert out.shape == (3, 3, 8)
    assert torch.equal(out[0], um.generic.detach())
    assert sum(p.numel() for p in um.parameters()) == 3 * 8 + 3 * 8 * 4 + 1001 * 4


def test_a_million_lowrank_users_fit_and_step_only_their_rows():
    """1,000,001 rows of r = 8 are 32 MB; one step reads and writes only the batch's rows."""
    um = build_user_model("lowrank", 1_000_000, 10, 64, rank=8, init="uniform", sparse=True)
    assert um.vectors.weight.numel() * 4 / 2**20 < 40  # MB
    opt = RowSparseAdamW(um.parameters(), lr=0.1)
    before = um.vectors.weight.detach()[[1, 999_999]].clone()
    users = torch.tensor([5, 123_456, 999_998])
    um(users).pow(2).mean().backward()
    clip_grad_norm_(um.parameters(), 1.0)
    opt.step()
    assert torch.equal(um.vectors.weight.detach()[[1, 999_999]], before)
    assert int((opt.state[um.vectors.weight]["row_step"] > 0).sum()) == 3
