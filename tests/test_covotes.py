"""`--user-start covotes`: users who judged the same responses alike start alike."""

import pytest
import torch

from prlhf.data.schema import PreferenceRecord
from prlhf.users.covotes import covote_basis, covote_factors, kmeans, rows_from_votes
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


def test_fold_in_places_a_new_voter_with_their_camp():
    records, a, b = two_camps()
    reg = UserRegistry.from_records(records)
    basis = covote_basis(records, reg, rank=2)
    own = basis.fold_in(records, a + b)  # the known users' own votes give back their factors
    torch.testing.assert_close(own, basis.factors[reg.indices(a + b)], atol=1e-4, rtol=0)
    newcomers = [PreferenceRecord("new_b", "topic", STATEMENTS[1], STATEMENTS[0]),
                 PreferenceRecord("stranger", "topic", "unheard 1", "unheard 2")]
    f = basis.fold_in(newcomers, ["new_b", "stranger", "silent"])
    assert f[0, 0] * basis.factors[reg.index(b[0]), 0] > 0  # one vote puts them on camp b's side
    assert torch.equal(f[1:], torch.zeros(2, 2))  # nothing shared, or nothing at all: no factor


def test_rows_from_votes_predicts_the_row_of_the_camp_a_new_user_votes_with():
    records, a, b = two_camps()
    reg = UserRegistry.from_records(records)
    basis = covote_basis(records, reg, rank=2)
    rows = torch.zeros(len(reg) + 1, 3)  # a trained table: each camp's users share a row
    rows[reg.indices(a)] = torch.tensor([1.0, 0.0, 2.0])
    rows[reg.indices(b)] = torch.tensor([0.0, 1.0, -2.0])
    newcomers = [PreferenceRecord("new_a", "topic", STATEMENTS[2], STATEMENTS[5]),
                 PreferenceRecord("new_b", "topic", STATEMENTS[7], STATEMENTS[4]),
                 PreferenceRecord("stranger", "topic", "unheard 1", "unheard 2")]
    start, has = rows_from_votes(basis, reg, rows, records, newcomers, ["new_a", "new_b", "stranger"])
    assert has.tolist() == [True, True, False]
    torch.testing.assert_close(start[0], rows[reg.index(a[0])], atol=1e-4, rtol=0)
    torch.testing.assert_close(start[1], rows[reg.index(b[0])], atol=1e-4, rtol=0)
    assert torch.equal(start[2], torch.zeros(3))


def test_adapt_starts_a_new_user_where_their_votes_point(tmp_path):
    """`adapt --warm-start covotes --steps 0` on a run trained from the co-vote start (rows barely moved): a newcomer
    who repeats a known user's votes starts at that user's row, one who shares nothing at the generic row."""
    from prlhf.config import ConfigError, TrainConfig
    from prlhf.data.tasks.common import write_jsonl
    from prlhf.runs.directory import load_run
    from prlhf.runs.users import read_user_table
    from prlhf.train.adapt import adapt_users
    from prlhf.train.loop import train

    records, a, _ = two_camps(n_per_camp=4)
    write_jsonl(tmp_path / "train.jsonl", records)
    train(TrainConfig(data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "run"), sft_steps=0, max_steps=1,
                      batch_size=4, user_tokens=2, threads=1, lora_dropout=0.0, user_start="covotes", user_lr=1e-9),
          show_progress=False)
    run, table = load_run(tmp_path / "run"), read_user_table(tmp_path / "run")
    clone = [PreferenceRecord("clone", r.prompt, r.chosen, r.rejected) for r in records if r.user_id == a[0]]
    newcomers = clone + [PreferenceRecord("stranger", "topic", "unheard 1", "unheard 2")]
    with pytest.raises(ConfigError, match="--known-data"):
        adapt_users(run, newcomers, steps=1, warm_start="covotes", show_progress=False)
    with pytest.raises(ConfigError, match="steps 0"):
        adapt_users(run, newcomers, steps=0, show_progress=False)
    new_run, report = adapt_users(run, newcomers, steps=0, warm_start="covotes", known_records=records,
                                  show_progress=False)  # steps 0: the start is the fit
    assert report["users"]["clone"]["init"] == "covotes" and report["users"]["stranger"]["init"].startswith("generic")
    rows = new_run.model.user_model.state_dict()["offsets.weight"]
    reg = new_run.registry
    torch.testing.assert_close(rows[reg.index("clone")], table.rows[table.registry.index(a[0])], atol=1e-4, rtol=0)
    assert torch.equal(rows[reg.index("stranger")], table.rows[0]) and report["initial_loss"] is None
