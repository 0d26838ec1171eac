"""The methods the demo and the benchmarks compare, defined once: name -> TrainConfig overrides.

A benchmark picks methods by name and adds only what is its own (the number of clusters, which data a method
trains on). The user-blind methods leave out the profile text unless their name says "text"; the split alpha
does not apply to them (the uniform user model has no user tokens, so l(e_u) = l(e_0)).
"""

from __future__ import annotations

from collections.abc import Sequence

METHODS: dict[str, dict] = {
    "vanilla_dpo": {"user_model": "uniform", "use_user_text": False},
    "text_dpo": {"user_model": "uniform", "use_user_text": True},
    "p_dpo_individual": {"user_model": "individual", "use_user_text": False},
    "p_dpo_individual_text": {"user_model": "individual", "use_user_text": True},
    "p_dpo_cluster": {"user_model": "cluster", "use_user_text": False},
    "p_dpo_lowrank": {"user_model": "lowrank", "use_user_text": False},
    "rm_uniform": {"objective": "rm", "user_model": "uniform", "use_user_text": False},
    "p_rm_individual": {"objective": "rm", "user_model": "individual", "use_user_text": False},
}

# the paper's experiment 1 (conflicting length preferences): `prlhf demo` and `prlhf bench length`
PAPER_METHODS = ("vanilla_dpo", "p_dpo_individual", "p_dpo_cluster")


def pick(names: Sequence[str], clusters: int | None = None) -> dict[str, dict]:
    """The overrides of `names`, in that order; `clusters` goes to the cluster methods."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return {n: {**METHODS[n], **({"clusters": clusters} if clusters and METHODS[n]["user_model"] == "cluster"
                                 else {})} for n in names}
