"""The speed benchmark's in-process pieces run and report what speed.json promises (the TRL side needs `trl`
and minutes, so it runs in `prlhf bench speed`, not here)."""

import pytest

from prlhf.bench.speed import METHODS, generation_speed, prepare, ratios, render, step_time_by_users

pytestmark = pytest.mark.slow


def test_pieces_and_report(tmp_path):
    setup = prepare(tmp_path, quick=True)
    by_users = step_time_by_users(setup, (10, 1000), sparse=True, repeats=4)
    assert set(by_users) == {"10", "1000"} and all(v > 0 for v in by_users.values())
    gen = generation_speed(setup, new_tokens=8, repeats=1)
    assert gen["plain"] > 0 and gen["personalized"] > 0
    fake = {"pairs_per_s": {m: 10.0 + i for i, m in enumerate(METHODS)},
            "peak_rss_mb": {m: 100.0 for m in METHODS}, "wall_s": {m: 1.0 for m in METHODS},
            "step_s_by_users": {"10": 0.1, "10000": 0.1, "100000": 0.11},
            "step_s_by_users_dense_table": {"10": 0.1, "10000": 0.2, "100000": 1.0},
            "gen_tokens_per_s": gen, "setup": {"n_pairs": 1, "batch_size": 8, "steps": 3, "repeats": 1,
                                               "model": "tiny", "threads": 1, "quick": True, "machine": "x"}}
    fake["ratios"] = ratios(fake)
    assert fake["ratios"]["prlhf_dpo_vs_trl"] == pytest.approx(11 / 10)
    assert fake["ratios"]["step_100k_vs_10_users"] == pytest.approx(1.1)
    text = render(fake)
    assert "| trl_dpo | 10.0 | 1.00x |" in text and "100,000" in text
