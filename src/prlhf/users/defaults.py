"""User-model kinds and adaptation defaults, importable without torch (the CLI's parser and --help need them)."""

USER_MODELS = ("uniform", "individual", "cluster", "lowrank")

# `prlhf adapt`: AdamW steps for the new users' rows, their rate as a multiple of the rate the run trained its
# users' rows with (a fixed rate does not carry across models: 0.1 suits the tiny model's rows but overshoots
# SmolLM2's soft tokens, trained at 3e-3: benchmarks/results/new_users_smollm2), and the warm starts on offer.
DEFAULT_STEPS = 40
ADAPT_LR_FACTOR = 1.0
WARM_STARTS = ("none", "text")
