"""One typed config per command. YAML files and CLI flags fill the same dataclass; unknown keys and wrong
types are rejected with a one-line error."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The user-model kinds a config may name (prlhf.users.models defines them; a test keeps the two lists equal).
# Here, not there, because the CLI's parser and --help must not import torch.
USER_MODELS = ("uniform", "individual", "cluster", "lowrank")

# `prlhf adapt`: AdamW steps for the new users' rows, their rate as a multiple of the rate the run trained its
# users' rows with (a fixed rate does not carry across models: 0.1 suits the tiny model's rows but overshoots
# SmolLM2's soft tokens, trained at 3e-3: benchmarks/results/new_users_smollm2), and the warm starts on offer.
DEFAULT_STEPS = 40
# Steps of a live fit in `prlhf serve`: half of `prlhf adapt`'s. On style-task users no report uses (seed 2; 8 new
# users, 10 comparisons each, 2 draws) 20 steps gave 0.968 held-out accuracy against 0.978 for 40, in 55% of the
# time; a user waits for their fit, so the server takes the shorter one (--onboard-steps).
ONBOARD_STEPS = 20
ADAPT_LR_FACTOR = 1.0
WARM_STARTS = ("none", "text", "covotes")

# The random-init tiny model needs a higher rate than a pretrained LM, and a warm-up to write at all.
TINY_LR = 1e-3
# Warm-up steps of the tiny model by objective. Any warm-up made P-DPO worse on new topics (style task, mean / worst
# held-out seen user: 1.00 / 1.00 without, 0.97 / 0.92 after 100 steps, 0.91 / 0.80 after 300). The reward model
# too: with 300 steps it scored 0.97 / 0.92, 0.91 / 0.60 and 0.82 / 0.64 on the tasks of seeds 0, 1 and 2; without
# one, and twice the passes (TINY_RM_EPOCHS), 0.98 / 0.84, 0.98 / 0.92 and 0.99 / 0.96
# (benchmarks/results/warmup_probe/). A policy that should write fluently needs a warm-up (`prlhf demo` warms up
# for DEMO_SFT_STEPS).
TINY_SFT_STEPS = {"dpo": 0, "rm": 0}
DEFAULT_EPOCHS = 3.0
# Without a warm-up the tiny reward model needs more passes: after 3 some users were not fitted even in training
# (in-sample worst 0.61-0.78), after 6 the worst was 0.98-1.00.
TINY_RM_EPOCHS = 6.0


class ConfigError(ValueError):
    """A bad config file or flag value; the message is one line."""


# Upper bounds far above any real use: they turn a typo (an extra zero, a negative sign) into a one-line error
# before any work, instead of an allocation that fails after the warm-up or a crash (100000 torch threads
# segfault). Fixed numbers, not a share of this machine, so a config that validates here validates everywhere.
MAX_THREADS = 1024
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_TOKENS = 1_000_000  # sequence lengths, generated tokens
MAX_USER_TOKENS = 4096
MAX_COUNT = 1 << 20  # ranks, clusters, batch sizes
MAX_STEPS = 10**9
MAX_CONFIG_BYTES = 1 << 20
REPR_LIMIT = 80


_REPR = reprlib.Repr()  # walks at most 3 levels and 8 items per level: never the whole of a huge value
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, REPR_LIMIT, REPR_LIMIT


def short_repr(value, limit: int = REPR_LIMIT) -> str:
    """repr(value) cut to `limit` characters: an error message never carries an unbounded value."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def range_problem(name: str, value: int, low: int, high: int) -> str | None:
    """Why `value` is not in [low, high], or None if it is."""
    return None if low <= value <= high else f"{name} must be in [{low}, {high}], got {value}"


# TrainConfig's integer fields: (lowest, highest) allowed, both inclusive
TRAIN_INT_RANGES = {
    "user_tokens": (1, MAX_USER_TOKENS), "clusters": (1, MAX_COUNT), "user_rank": (1, MAX_COUNT),
    "covote_rank": (1, MAX_COUNT),
    "max_steps": (0, MAX_STEPS), "batch_size": (1, MAX_COUNT), "grad_accum": (1, MAX_COUNT), "seed": (0, MAX_SEED),
    "lora_r": (1, MAX_COUNT), "lora_alpha": (1, MAX_COUNT), "max_length": (2, MAX_TOKENS),
    "max_prompt_length": (1, MAX_TOKENS), "sft_steps": (-1, MAX_STEPS), "save_steps": (0, MAX_STEPS),
    "keep_checkpoints": (1, MAX_COUNT), "log_steps": (1, MAX_STEPS), "eval_steps": (0, MAX_STEPS),
    "threads": (0, MAX_THREADS),
}


def _meta(help: str, **kw):
    return field(metadata={"help": help}, **kw)


def _default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


@dataclass
class TrainConfig:
    data: str = _meta("training data: .jsonl/.json/.csv/.parquet or a `datasets` folder (DIR or DIR::SPLIT)",
                      default="")
    out: str = _meta("run directory to write (adapter, user model, registry, config, metrics, checkpoints)",
                     default="")
    model: str = _meta("'tiny' (built-in random-init LM, tokenizer trained on the data) or a hub id / local "
                       "folder of any causal LM", default="tiny")
    objective: str = _meta("dpo (P-DPO: train the policy) | rm (P-RM: a personalized reward model, scalar head on "
                           "the LM, Bradley-Terry loss with the same alpha split)", default="dpo")
    reward_pool: str = _meta("objective rm: the hidden state the scalar head reads: last (the last real token, as "
                             "transformers' sequence classifiers do) | mean (the mean over the response's tokens)",
                             default="last")
    user_model: str = _meta(f"user model: {' | '.join(USER_MODELS)} (uniform = vanilla DPO)", default="individual")
    user_tokens: int = _meta("T_u, soft tokens per user", default=10)
    clusters: int = _meta("K, prototypes of the cluster user model", default=4)
    cluster_logit_std: float = _meta("std of the cluster model's initial mixing logits (0.1: every user starts near "
                                     "an even mix of the prototypes)", default=0.1)
    user_rank: int = _meta("r, size of each user's vector in the lowrank user model", default=8)
    lowrank_vector_std: float = _meta("std of the lowrank model's initial user vectors (1: v_i ~ N(0, I); near 0: "
                                      "every user starts near the generic user)", default=1.0)
    user_init: str = _meta("soft-token init: vocab (random vocabulary embeddings) | uniform | zeros",
                           default="vocab")
    user_start: str = _meta("where seen users' rows start: random (the init above, independent per user) | covotes "
                            "(users who chose and rejected the same responses in the training data start alike: "
                            "the leading factors of the users x responses vote matrix set individual offsets along "
                            "a shared random basis, cluster users on their k-means cluster, low-rank vectors' "
                            "leading entries; for data where many users judge the same responses, such as Polis)",
                            default="random")
    covote_rank: int = _meta("user_start covotes: number of vote-matrix factors used", default=2)
    alpha: float = _meta("weight of the user's term; 1 - alpha goes to the generic user e_0", default=0.5)
    beta: float = _meta("DPO temperature beta", default=0.5)
    loss: str = _meta("preference loss l: dpo (P-DPO)", default="dpo")
    nll_weight: float = _meta("weight of an NLL term on each chosen response under its user's embedding (RPO, "
                              "TRL's rpo_alpha); 0 = the paper's P-DPO", default=0.0)
    epochs: float = _meta(f"passes over the training pairs (-1 = {DEFAULT_EPOCHS:g}, or {TINY_RM_EPOCHS:g} for "
                          "objective rm on tiny)", default=-1.0)
    max_steps: int = _meta("stop after this many optimizer steps (0 = no limit)", default=0)
    batch_size: int = _meta("pairs per optimizer step (per process, before accumulation)", default=16)
    grad_accum: int = _meta("gradient accumulation steps", default=1)
    group_by_length: bool = _meta("batch pairs of similar length together (less padding: faster on long, varied "
                                  "data; but it makes batches less mixed, which cost the style task's worst user "
                                  "0.85 -> 0.70 accuracy)", default=False)
    lr: float = _meta("learning rate of the LM adapters (0 = 1e-3 for tiny, 5e-5 otherwise)", default=0.0)
    user_lr: float = _meta("learning rate of the user model (0 = 30x lr: soft tokens move slowly at the LM's rate)",
                           default=0.0)
    user_code_lr: float = _meta("learning rate of the cluster model's mixing logits and the low-rank model's user "
                                "vectors (0 = user_lr): these are O(1) numbers, where soft tokens are on the scale of "
                                "the LM's embeddings (std 0.14 for SmolLM2)", default=0.0)
    weight_decay: float = _meta("AdamW weight decay of the adapters", default=0.0)
    user_weight_decay: float = _meta("AdamW weight decay of the per-user rows, applied when a user is in the batch: "
                                     "pulls individual/lowrank users towards the generic user, cluster users "
                                     "towards an even mix (shared user parameters get none)", default=0.0)
    warmup_ratio: float = _meta("share of steps with linear warm-up before the cosine decay", default=0.1)
    max_grad_norm: float = _meta("gradient clipping norm (0 = off)", default=1.0)
    seed: int = _meta("random seed (model init, data order, dropout)", default=0)
    lora_r: int = _meta("LoRA rank", default=8)
    lora_alpha: int = _meta("LoRA alpha", default=16)
    lora_dropout: float = _meta("LoRA dropout", default=0.05)
    disable_dropout: bool = _meta("zero the base LM's own dropout (GPT-2's 0.1, for one) after any warm-up, as TRL's "
                                  "DPOConfig does by default: the reference log-probs are computed without dropout, so "
                                  "with it on the implicit rewards start as noise; LoRA's is set by lora_dropout",
                                  default=True)
    lora_targets: str = _meta("LoRA target modules: 'all-linear' or comma-separated module names",
                              default="all-linear")
    max_length: int = _meta("max prompt + response tokens (user tokens come on top)", default=512)
    max_prompt_length: int = _meta("max prompt tokens (kept from the end)", default=256)
    use_user_text: bool = _meta("put each record's user_text before its prompt (explicit preferences)",
                                default=True)
    sft_steps: int = _meta("supervised warm-up steps on the responses before training (-1 = for tiny "
                           f"{TINY_SFT_STEPS['dpo']} with objective dpo and {TINY_SFT_STEPS['rm']} with rm, 0 for "
                           "other models)", default=-1)
    sft_holdout: float = _meta("share of the training prompts whose responses are held out of the warm-up to stop it "
                               "early when their token NLL stops improving (0 = run all sft_steps)", default=0.0)
    gradient_checkpointing: bool = _meta("recompute each layer's activations in the backward pass: a SmolLM2 "
                                         "step in bf16 on a CPU took 2.5x less memory and 1.6x longer (and "
                                         "turns shared prompts off)", default=False)
    share_prompts: bool = _meta("score the responses that share a prompt (chosen, rejected, their generic copies) "
                                "from one forward of that prompt and its KV cache: same log-probs; SmolLM2 steps with "
                                "short answers ran 2.0x faster in fp32, 1.5x in bf16 (off under gradient "
                                "checkpointing; objective dpo only: the reward model scores each row in full)",
                                default=True)
    mixed_precision: str = _meta("auto | no | bf16 | fp16 (auto = bf16 on a GPU that supports it)", default="auto")
    save_steps: int = _meta("checkpoint every N optimizer steps (0 = once per epoch)", default=0)
    keep_checkpoints: int = _meta("how many recent checkpoints to keep", default=2)
    log_steps: int = _meta("log metrics every N optimizer steps", default=10)
    reference_cache: str = _meta("where reference log-probs are cached across runs: auto ($PRLHF_CACHE_DIR or "
                                 "~/.cache/prlhf) | none | a folder (objective dpo only: a reward model has no reference)",
                                 default="auto")
    eval_data: str = _meta("held-out files to evaluate during training, comma-separated (per-user implicit-reward "
                           "accuracy, rows in RUN/eval.jsonl)", default="")
    eval_steps: int = _meta("evaluate --eval-data every N optimizer steps, and at the end (0 = only at the end)",
                            default=0)
    report_to: str = _meta("experiment tracker through Accelerate: auto | tensorboard | wandb | none (auto = "
                           "tensorboard when installed, else none); logs the metrics.jsonl rows", default="auto")
    threads: int = _meta("torch CPU threads (0 = torch's default)", default=0)
    resume: bool = _meta("continue from the last checkpoint in --out", default=False)

    def validate(self) -> "TrainConfig":
        if not self.data:
            raise ConfigError("train: --data is required")
        if not self.out:
            raise ConfigError("train: --out is required")
        for f in dataclasses.fields(self):  # nan and inf slip through comparisons such as `lr >= 0`
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"train: {f.name} must be a finite number, got {value}")
        checks = [
            (self.user_model in USER_MODELS, f"user_model must be one of {', '.join(USER_MODELS)}"),
            (self.user_init in ("vocab", "uniform", "zeros"), "user_init must be vocab, uniform or zeros"),
            (self.user_start in ("random", "covotes"), "user_start must be random or covotes"),
            (self.loss == "dpo", "loss must be 'dpo'"),
            (self.objective in ("dpo", "rm"), "objective must be dpo or rm"),
            (self.reward_pool in ("last", "mean"), "reward_pool must be last or mean"),
            (self.objective == "dpo" or self.nll_weight == 0, "nll_weight applies to objective dpo only"),
            (self.objective == "dpo" or self.beta == _default(TrainConfig, "beta"),
             "beta applies to objective dpo only (the reward model's Bradley-Terry loss has no temperature)"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
            (self.beta > 0, "beta must be > 0"),
            (self.nll_weight >= 0, "nll_weight must be >= 0"),
            (self.user_tokens >= 1, "user_tokens must be >= 1"),
            (self.clusters >= 1, "clusters must be >= 1"),
            (self.cluster_logit_std >= 0, "cluster_logit_std must be >= 0"),
            (self.lowrank_vector_std >= 0, "lowrank_vector_std must be >= 0"),
            (0.0 <= self.sft_holdout < 1.0, "sft_holdout must be in [0, 1)"),
            (self.user_rank >= 1, "user_rank must be >= 1"),
            (self.epochs > 0 or self.epochs == -1, "epochs must be > 0 (or -1: the default for the model)"),
            (self.max_steps >= 0, "max_steps must be >= 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.lr >= 0 and self.user_lr >= 0 and self.user_code_lr >= 0, "learning rates must be >= 0"),
            (self.weight_decay >= 0 and self.user_weight_decay >= 0, "weight decays must be >= 0"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
            (self.max_length > self.max_prompt_length > 0, "need max_length > max_prompt_length > 0"),
            (self.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision must be auto/no/bf16/fp16"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.eval_steps >= 0, "eval_steps must be >= 0"),
            (self.report_to in ("auto", "tensorboard", "wandb", "none"),
             "report_to must be auto, tensorboard, wandb or none"),
            (0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (all(t.strip() for t in self.lora_targets.split(",")),
             f"lora_targets: a comma-separated list of module names, got {short_repr(self.lora_targets)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"train: {message}")
        for name, (low, high) in TRAIN_INT_RANGES.items():
            if problem := range_problem(name, getattr(self, name), low, high):
                raise ConfigError(f"train: {problem}")
        return self

    def lora_target_modules(self) -> str | list[str]:
        """PEFT's target_modules: 'all-linear' or the list of module names."""
        return self.lora_targets if self.lora_targets == "all-linear" else self.lora_targets.split(",")

    @property
    def is_tiny(self) -> bool:
        return self.model == "tiny"

    def resolved_lr(self) -> float:
        return self.lr or (TINY_LR if self.is_tiny else 5e-5)

    def resolved_user_lr(self) -> float:
        return self.user_lr or 30 * self.resolved_lr()

    def resolved_user_code_lr(self) -> float:
        return self.user_code_lr or self.resolved_user_lr()

    def resolved_epochs(self) -> float:
        if self.epochs > 0:
            return self.epochs
        return TINY_RM_EPOCHS if self.is_tiny and self.objective == "rm" else DEFAULT_EPOCHS

    def resolved_sft_steps(self) -> int:
        return (TINY_SFT_STEPS[self.objective] if self.is_tiny else 0) if self.sft_steps < 0 else self.sft_steps


def field_type(cfg_cls, name: str) -> type:
    hints = typing.get_type_hints(cfg_cls)
    t = hints[name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def coerce(cfg_cls, name: str, value, source: str):
    """Check a value from YAML against the field's type (ints are accepted for floats, nothing else)."""
    t = field_type(cfg_cls, name)
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: key '{name}': expected {t.__name__}, got {type(value).__name__} "
                          f"{short_repr(value)}")
    return value


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases. A config has no use for them, and a few nested aliases
    ("billion laughs") stand for billions of nodes, expanded by anything that walks or prints the value."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config file",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def read_config_text(path: Path) -> str:
    """The file's text, or a one-line ConfigError: too large, unreadable, or not UTF-8."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None


def load_config_file(cfg_cls, path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(read_config_text(path), Loader=NoAliasLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML ({' '.join(problem.split())[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    out = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key not in names:
            raise ConfigError(f"{path}: unknown key {short_repr(key)} (known: {', '.join(sorted(names))})")
        out[key] = coerce(cfg_cls, key, value, str(path))
    return out


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
