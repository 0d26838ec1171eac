"""User-model kinds and adaptation defaults, importable without torch (the CLI's parser and --help need them)."""

USER_MODELS = ("uniform", "individual", "cluster", "lowrank")

# `prlhf adapt`: AdamW steps and rate for the new users' rows, and the warm starts on offer.
DEFAULT_STEPS = 40
DEFAULT_LR = 0.1
WARM_STARTS = ("none", "text")
