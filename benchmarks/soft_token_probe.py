"""Do a trained P-DPO run's user tokens carry the user's preferences? Held-out margins of seen users under their
own soft tokens, under the generic user's, and under those of a seen user with the opposite profile
(persona task). If the tokens encoded the users' poles, accuracy would drop sharply with the opposite profile's.

    prlhf bench persona ... --keep-runs --out OUT
    python benchmarks/soft_token_probe.py OUT/work/runs/p_dpo_individual OUT/work/data
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch

from prlhf.data.loading import load_records
from prlhf.model.scoring import implicit_reward_margins
from prlhf.runs.directory import load_run
from prlhf.train.reference import cached_reference_logps, reference_cache_dir


def main(run_dir: str, data: str) -> dict:
    run = load_run(run_dir)
    users = json.load(open(f"{data}/users.json"))["users"]
    first_user_of = {}
    for uid, info in users.items():
        if info["seen"]:
            first_user_of.setdefault(info["profile_id"], uid)
    records = [r for r in load_records(f"{data}/test.jsonl") if users[r.user_id]["seen"]]
    cfg, pad = run.config, run.tokenizer.pad_token_id
    pairs = run.encode(records)
    reference = cached_reference_logps(run.model, pairs, pad, reference_cache_dir(cfg.reference_cache))

    def margins(user_ids: list[str]) -> torch.Tensor:  # (N,), the same pairs under other users' tokens
        swapped = [replace(p, user_id=u) for p, u in zip(pairs, user_ids)]
        return implicit_reward_margins(run.model, swapped, run.registry, pad, reference=reference)

    def opposite(profile_id: str) -> str:  # profile ids are one letter (A/B) per dimension
        return first_user_of.get(profile_id.translate(str.maketrans("AB", "BA")), "unseen")

    own = margins([r.user_id for r in records])
    generic = margins(["unseen"] * len(records))
    flipped = margins([opposite(users[r.user_id]["profile_id"]) for r in records])
    user_model = run.model.user_model
    acc = lambda m: round((m > 0).float().mean().item(), 4)  # noqa: E731
    return {"run": run_dir, "pairs": len(records),
            "accuracy": {"own_tokens": acc(own), "generic_tokens": acc(generic),
                         "opposite_profile_tokens": acc(flipped)},
            "mean_abs_margin_own": round(own.abs().mean().item(), 4),
            "mean_abs_change_generic": round((own - generic).abs().mean().item(), 4),
            "mean_abs_change_opposite": round((own - flipped).abs().mean().item(), 4),
            "same_sign_own_vs_generic": acc((own > 0) == (generic > 0)),
            "generic_token_norms": [round(x, 3) for x in user_model.generic.norm(dim=-1).tolist()],
            "vocab_embedding_norm_median": round(run.model.lm.get_input_embeddings().weight.norm(dim=-1)
                                                 .median().item(), 3)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1], sys.argv[2]), indent=1))
