"""The speed benchmark's in-process pieces run and report what speed.json promises (the TRL side needs `trl`
and minutes, so it runs in `prlhf bench speed`, not here)."""

import pytest

from prlhf.bench.flops import ModelShape, flops_per_pair
from prlhf.bench.speed import (METHODS, PRLHF_METHODS, USER_TOKENS, data_lengths, encoded_pairs, generation_speed,
                               prepare, profile_step, ratios, render, run_speed_bench, step_time_by_users,
                               summarise)

pytestmark = pytest.mark.slow


def test_pieces_and_report(tmp_path):
    setup = prepare(tmp_path, quick=True)
    by_users = step_time_by_users(setup, (10, 1000), sparse=True, repeats=4)
    assert set(by_users) == {"10", "1000"} and all(v > 0 for v in by_users.values())
    gen = generation_speed(setup, new_tokens=8, repeats=1)
    assert gen["plain"] > 0 and gen["personalized"] > 0
    # per-process results as the workers report them: TRL's constructor 2 s longer with its reference pass
    runs = {m: [{"pairs_per_s": 10.0 + i, "peak_rss_mb": 100.0, "wall_s": 1.0,
                 "init_s": 3.0 if m == "trl_dpo_precomputed" else 1.0, "reference_s": 0.5}]
            for i, m in enumerate(METHODS)}
    base, pairs = encoded_pairs(setup)
    lengths, shape = data_lengths(pairs), ModelShape.of(base, lora_r=8)
    block = summarise(runs, setup, flops_per_pair(shape, pairs, METHODS, USER_TOKENS), shape, lengths, "fp32")
    assert block["reference_s"]["trl_dpo"] == 0 and block["reference_s"]["trl_dpo_precomputed"] == pytest.approx(2)
    n = setup["n_pairs"]
    assert block["end_to_end_pairs_per_s"]["prlhf_dpo"] == pytest.approx(n / (0.5 + n / 12.0))
    assert block["end_to_end_pairs_per_s"]["trl_dpo"] == pytest.approx(10.0)  # its reference is in its steps
    assert all(0 < block["peak_share"][m] for m in METHODS) and block["matmul_peak_flops"] > 0
    fake = {"model": "tiny", "dtype": "fp32", **block, "by_dtype": {"fp32": block},
            "step_s_by_users": {"10": 0.1, "10000": 0.1, "100000": 0.11},
            "step_s_by_users_dense_table": {"10": 0.1, "10000": 0.2, "100000": 1.0},
            "gen_tokens_per_s": gen, "profile_s": profile_step(setup, "fp32", steps=1),
            "setup": {"n_pairs": n, "batch_size": 8, "steps": 3, "repeats": 1, "model": "tiny", "threads": 1,
                      "quick": True, "dtypes": ["fp32"], "lengths": lengths, "machine": "x", "lora_dropout": 0.0}}
    assert fake["profile_s"]["by_kind"]["matmul"] > 0 and fake["profile_s"]["top_operators"]
    fake["ratios"] = ratios(fake)
    assert fake["ratios"]["prlhf_dpo_vs_trl"] == pytest.approx(12 / 10)
    assert fake["ratios"]["prlhf_dpo_vs_trl_precomputed"] == pytest.approx(12 / 11)
    assert fake["ratios"]["step_100k_vs_10_users"] == pytest.approx(1.1)
    assert set(PRLHF_METHODS) < set(METHODS)
    text = render(fake)
    assert "| trl_dpo | 10.00 | 1.00x |" in text and "100,000" in text and "matmul" in text
    assert "dropout 0 on both sides" in text


def test_a_bad_lora_dropout_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="lora dropout"):
        run_speed_bench(tmp_path / "out", lora_dropout=1.0)
    assert not (tmp_path / "out").exists()
