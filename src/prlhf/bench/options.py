"""What the trained methods of every benchmark share: TrainConfig defaults by model, and the bench flags that
override them (generated from TrainConfig's own fields and help by the CLI). No torch: the CLI's --help reads it."""

from __future__ import annotations

from dataclasses import fields

from prlhf.config import TrainConfig

# TrainConfig values of every trained method unless the caller gives others. For a pretrained model they are the
# recipe that separated P-DPO from vanilla DPO on SmolLM2-135M (benchmarks/results/persona_smollm2_h200_48pairs/):
# at the tiny model's 30x user-model rate SmolLM2's soft tokens did not fit even their training pairs, and the
# cluster logits / low-rank vectors are O(1) numbers that need a higher rate than the soft tokens.
TINY_TRAIN_DEFAULTS = {"threads": 2, "batch_size": 16, "user_tokens": 10, "lr": 0.0}
PRETRAINED_TRAIN_DEFAULTS = {"threads": 2, "batch_size": 64, "user_tokens": 4, "lr": 1e-3, "user_lr": 3e-3,
                             "user_code_lr": 3e-2}
# On a CPU the default 64 pairs per step go in micro-batches of 16 (gradient accumulation): one 64-pair SmolLM2
# batch ran out of 24 GB there, in fp32 and in bf16.
CPU_MICRO_BATCH = 16

# TrainConfig fields that `bench persona` and `bench tldr` take as flags (`bench polis` takes its own list)
TRAIN_FLAGS = ("threads", "lr", "user_lr", "user_code_lr", "user_tokens", "batch_size", "grad_accum",
               "mixed_precision", "user_weight_decay", "gradient_checkpointing")


def bench_train_options(model: str, train_options: dict, device: str = "cpu") -> dict:
    """The TrainConfig options of every trained method: the caller's (None = not given) over the model's defaults."""
    unknown = set(train_options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}")
    given = {k: v for k, v in train_options.items() if v is not None}
    defaults = dict(TINY_TRAIN_DEFAULTS if model == "tiny" else PRETRAINED_TRAIN_DEFAULTS)
    if device == "cpu" and "batch_size" not in given and defaults["batch_size"] > CPU_MICRO_BATCH:
        defaults.update(batch_size=CPU_MICRO_BATCH, grad_accum=defaults["batch_size"] // CPU_MICRO_BATCH)
    return {**defaults, **given}


def default_notes(names: tuple[str, ...]) -> dict[str, str]:
    """field -> its default in a benchmark, for --help, where that differs from TrainConfig's."""
    own = {f.name: f.default for f in fields(TrainConfig)}
    notes = {}
    for name in names:
        tiny, pretrained = TINY_TRAIN_DEFAULTS.get(name), PRETRAINED_TRAIN_DEFAULTS.get(name)
        if tiny is not None or pretrained is not None:
            tiny, pretrained = own[name] if tiny is None else tiny, own[name] if pretrained is None else pretrained
            notes[name] = str(tiny) if tiny == pretrained else f"{tiny} with tiny, {pretrained} with a pretrained model"
    if "batch_size" in notes:
        notes["batch_size"] += (f"; on a CPU a pretrained model's {PRETRAINED_TRAIN_DEFAULTS['batch_size']} go in "
                                f"micro-batches of {CPU_MICRO_BATCH}")
    return notes
