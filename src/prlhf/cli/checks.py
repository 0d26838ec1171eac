"""Range checks of the plain flags (every command but `train`, whose flags TrainConfig.validate checks), run before
a command loads anything, so a mistake is one line at once, not a traceback or a crash after minutes of work."""

from __future__ import annotations

import argparse
import math

from prlhf.config import (MAX_COUNT, MAX_SEED, MAX_STEPS, MAX_THREADS, MAX_TOKENS, MAX_USER_TOKENS, ConfigError,
                          range_problem)

MAX_USERS = 100_000  # synthetic users of `data build` / `bench`: 10,000 users were tested end to end
MAX_PAIRS_PER_USER = 10_000
MAX_SAMPLES = 10_000

# integer flag -> (lowest, highest) allowed, both inclusive; the same flag means the same in every command
INT_RANGES = {
    "threads": (0, MAX_THREADS), "seed": (0, MAX_SEED), "max_new_tokens": (1, MAX_TOKENS), "n": (1, MAX_SAMPLES),
    "steps": (1, MAX_STEPS), "users": (1, MAX_USERS), "unseen": (0, MAX_USERS),
    "train_pairs_per_user": (1, MAX_PAIRS_PER_USER), "test_pairs_per_user": (1, MAX_PAIRS_PER_USER),
    "statements_per_pole": (1, MAX_PAIRS_PER_USER), "curve_points": (1, 1000), "batch_size": (1, MAX_COUNT),
    "grad_accum": (1, MAX_COUNT), "user_tokens": (1, MAX_USER_TOKENS),
}
# float flag -> (allowed?, what is allowed); every float flag must also be finite (argparse takes "nan", "inf")
FLOAT_RULES = {
    "lr": (lambda v: v > 0, "> 0"), "user_lr": (lambda v: v >= 0, ">= 0"), "user_code_lr": (lambda v: v >= 0, ">= 0"),
    "epochs": (lambda v: v > 0 or v == -1, "> 0 (or -1: the default for the model)"),
    "holdout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "nll_weight": (lambda v: v >= 0, ">= 0"), "user_weight_decay": (lambda v: v >= 0, ">= 0"),
}


def flag_problem(name: str, value) -> str | None:
    """Why the value of flag `name` is out of range, or None (also for flags without a rule, and unset ones)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
        ok, allowed = FLOAT_RULES.get(name, (None, ""))
        return None if ok is None or ok(value) else f"{flag} must be {allowed}, got {value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and name in INT_RANGES:
        return range_problem(flag, value, *INT_RANGES[name])
    return None


def check_flags(args: argparse.Namespace, command: str) -> None:
    """A one-line ConfigError for the first flag out of range."""
    if command == "train":  # TrainConfig.validate checks these, and the --config file's values with them
        return
    for name, value in vars(args).items():
        if problem := flag_problem(name, value):
            raise ConfigError(f"{command}: {problem}")
