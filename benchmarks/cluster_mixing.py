"""Where a cluster run's users sit among its prototypes, at each kept checkpoint and at the end.

For the seen users: the std of their mixing logits, their largest mixing weight (an even mix of K is 1/K), and the
profile purity of the groups that share a largest prototype (the share of users whose profile is their group's
most common one), next to the purity of the same groups with the profiles shuffled (the chance level).

    python benchmarks/cluster_mixing.py RUN_DIR DATA/users.json   # users.json of `prlhf data build persona`
"""

from __future__ import annotations

import argparse
import collections
import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from prlhf.runs.directory import current_version
from prlhf.train.checkpoint import list_checkpoints


def purity(groups: list[int], profiles: list[str]) -> float:
    by_group = collections.defaultdict(collections.Counter)
    for g, p in zip(groups, profiles):
        by_group[g][p] += 1
    return sum(c.most_common(1)[0][1] for c in by_group.values()) / len(groups)


def mixing_stats(weights_file: Path, profiles: list[str], shuffles: int = 200) -> dict:
    state = load_file(str(weights_file))
    logits = state[next(k for k in state if k.endswith("weights.weight"))].float()[1:]  # (N, K); row 0 = e_0
    mix = torch.softmax(logits, -1)
    groups = mix.argmax(-1).tolist()
    rng = random.Random(0)
    chance = sum(purity(groups, rng.sample(profiles, len(profiles))) for _ in range(shuffles)) / shuffles
    return {"logit_std": logits.std(-1).mean().item(), "largest_weight_mean": mix.max(-1).values.mean().item(),
            "largest_weight_max": mix.max().item(), "profile_purity": purity(groups, profiles),
            "profile_purity_chance": chance}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("users", type=Path)
    args = ap.parse_args()
    users = json.loads(args.users.read_text())["users"]
    seen = sorted(u for u, v in users.items() if v["seen"])  # the registry's order: sorted ids, from index 1
    profiles = [users[u]["profile_id"] for u in seen]
    files = {path.name: path / "model.safetensors" for _, path in list_checkpoints(args.run)}
    if (args.run / "run.json").is_file():  # a finished run: its current version's user model
        files["final"] = current_version(args.run) / "user_model.safetensors"
    for name, path in files.items():
        stats = mixing_stats(path, profiles)
        print(name, json.dumps({k: round(v, 3) for k, v in stats.items()}))


if __name__ == "__main__":
    main()
