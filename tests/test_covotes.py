"""`--user-start covotes`: users who judged the same responses alike start alike."""

import torch

from prlhf.data.schema import PreferenceRecord
from prlhf.users.covotes import covote_factors, kmeans
from prlhf.users.models import build_user_model
from prlhf.users.registry import UserRegistry

STATEMENTS = [f"statement {i}" for i in range(8)]


def two_camps(n_per_camp: int = 6) -> tuple[list[PreferenceRecord], list[str], list[str]]:
    """Camp a prefers the even statements, camp b the odd ones; 'loner' judges only texts nobody else judged
    (which says nothing about whom they agree with)."""
    records, a, b = [], [f"a{i}" for i in range(n_per_camp)], [f"b{i}" for i in range(n_per_camp)]
    for users, winners in ((a, STATEMENTS[0::2]), (b, STATEMENTS[1::2])):
        losers = [s for s in STATEMENTS if s not in winners]
        for u in users:
            records += [PreferenceRecord(u, "topic", w, l) for w, l in zip(winners, losers)]
    records += [PreferenceRecord("loner", "topic", "own text 1", "own text 2")]
    return records, a, b


def test_factors_separate_camps_and_leave_the_generic_and_uninformative_users_at_zero():
    records, a, b = two_camps()
    reg = UserRegistry.from_records(records)
    f = covote_factors(records, reg, rank=2)  # (N+1, 2)
    assert f.shape == (len(reg) + 1, 2)
    assert torch.equal(f[0], torch.zeros(2)) and torch.equal(f[reg.index("loner")], torch.zeros(2))
    lead = f[:, 0]
    side_a, side_b = lead[reg.indices(a)], lead[reg.indices(b)]
    assert torch.allclose(side_a, side_a[0].expand_as(side_a)) and torch.allclose(side_b, side_b[0].expand_as(side_b))
    assert side_a[0] * side_b[0] < 0  # the camps sit on opposite sides of the leading factor
    assert torch.allclose(f[1:, 0].pow(2).mean(), torch.tensor(1.0), atol=1e-5)  # unit RMS
    assert torch.allclose(f[:, 1], torch.zeros(len(f)), atol=1e-5)  # one axis explains two camps


def test_factors_do_not_touch_the_global_rng():
    records, _, _ = two_camps()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    covote_factors(records, UserRegistry.from_records(records), rank=2)
    assert torch.equal(torch.rand(3), expected)


def test_kmeans_finds_two_well_separated_blobs():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(20, 2, generator=g) * 0.1 + 5, torch.randn(30, 2, generator=g) * 0.1 - 5])
    assign = kmeans(points, 2, torch.Generator().manual_seed(1))
    assert len(set(assign[:20].tolist())) == 1 and len(set(assign[20:].tolist())) == 1 and assign[0] != assign[-1]


def test_each_kind_starts_the_camps_apart_and_the_generic_user_where_it_was():
    records, a, b = two_camps()
    reg = UserRegistry.from_records(records)
    f = covote_factors(records, reg, rank=2)
    ia, ib, loner = reg.indices(a), reg.indices(b), reg.index("loner")
    n, emb = len(reg), torch.randn(40, 4)

    ind = build_user_model("individual", n, 2, 4, input_embeddings=emb, factors=f)
    rows = ind.offsets.weight.detach()
    assert torch.allclose(rows[ia], rows[ia[0]].expand(len(ia), -1), atol=1e-6)
    assert not torch.allclose(rows[ia[0]], rows[ib[0]])
    assert torch.equal(rows[0], torch.zeros(8)) and torch.allclose(rows[loner], torch.zeros(8))
    # offsets about the size of the default's random ones
    default = build_user_model("individual", n, 2, 4, input_embeddings=emb).offsets.weight.detach()[1:]
    ratio = rows[1:].norm(dim=1).mean() / default.norm(dim=1).mean()
    assert 0.3 < ratio < 3

    cl = build_user_model("cluster", n, 2, 4, num_clusters=2, input_embeddings=emb, factors=f)
    mix = torch.softmax(cl.weights.weight.detach(), dim=-1)
    assert (mix[ia].argmax(1) == mix[ia[0]].argmax()).all() and (mix[ib].argmax(1) != mix[ia[0]].argmax()).all()
    assert mix[ia].max(1).values.min() > 0.8
    assert (mix[0] - 0.5).abs().max() < 0.2  # the generic user still starts near the even mix

    lr = build_user_model("lowrank", n, 2, 4, rank=3, input_embeddings=emb, factors=f, vector_std=0.5, seed=1)
    plain = build_user_model("lowrank", n, 2, 4, rank=3, input_embeddings=emb, vector_std=0.5, seed=1)
    vec = lr.vectors.weight.detach()
    assert torch.allclose(vec[1:, :2], 0.5 * f[1:]) and torch.equal(vec[0], torch.zeros(3))
    assert torch.equal(vec[1:, 2], plain.vectors.weight.detach()[1:, 2])  # the dimension past the factors: as before


def test_train_seeds_the_user_model_from_the_training_records(task_dir, tmp_path, monkeypatch):
    """`prlhf train --user-start covotes` computes the factors of the training records and builds the user model
    from them (and the run's config records the choice)."""
    import prlhf.train.loop as loop
    from test_train_resume import config

    seen = {}

    def spy_factors(records, registry, rank, seed):
        seen["factors"] = covote_factors(records, registry, rank, seed)
        seen["n_records"], seen["rank"] = len(records), rank
        return seen["factors"]

    def spy_build(*args, **kwargs):
        seen["given"] = kwargs.get("factors")
        return build_user_model(*args, **kwargs)

    monkeypatch.setattr(loop, "covote_factors", spy_factors)
    monkeypatch.setattr(loop, "build_user_model", spy_build)
    out = tmp_path / "run"
    loop.train(config(task_dir, out, max_steps=1, user_start="covotes", covote_rank=3), show_progress=False)
    assert seen["rank"] == 3 and seen["n_records"] == 36 and seen["given"] is seen["factors"]
    assert "user_start: covotes" in (out / "config.yaml").read_text()
    seen.clear()
    loop.train(config(task_dir, tmp_path / "plain", max_steps=1), show_progress=False)
    assert "rank" not in seen and seen["given"] is None  # the default start draws no factors
