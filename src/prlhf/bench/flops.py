"""What the machine can do and what a step asks of it: model FLOPs per pair of each method, the sustained matmul
rate at the run's dtype and shapes, and a profile of one step.

FLOPs are counted, not measured: 2 per multiply-add of every matmul the method's implementation runs on real (not
padding) tokens. A frozen linear layer costs 2·in·out per token forward and the same again backward (the input's
gradient only; the weight gets none); a LoRA adapter of rank r costs 2·r·(in + out) forward and twice that
backward (the input's gradient and its own two weight gradients). Causal attention costs 4·q_dim per
(query, visible key) forward and twice that backward. The output head runs only where a log-prob is needed (the
response positions, for prlhf and TRL alike). Elementwise work, norms, softmax and the optimizer are not counted:
they are what separates the achieved rate from the matmul rate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prlhf.data.tokenize import EncodedPair


@dataclass(frozen=True)
class ModelShape:
    linear: int        # sum of in·out over the transformer's linear layers (the output head excluded)
    lora: int          # sum of r·(in + out) over the adapted layers
    head: int          # d · vocabulary (the output head)
    attention: int     # layers · query width: attention costs 4 · this per (query, visible key)
    linears: tuple[tuple[int, int], ...]  # the distinct (in, out) of the linear layers, for the matmul peak

    @classmethod
    def of(cls, base: nn.Module, lora_r: int) -> ModelShape:
        """From a transformers causal LM before LoRA is added (every linear layer but the head adapted, as
        `all-linear` adapts them)."""
        head = base.get_output_embeddings()
        linears = [m for m in base.modules() if isinstance(m, nn.Linear) and m is not head]
        config = base.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(sum(m.in_features * m.out_features for m in linears),
                   sum(lora_r * (m.in_features + m.out_features) for m in linears),
                   head.in_features * head.out_features, config.num_hidden_layers * heads * head_dim,
                   tuple(sorted({(m.in_features, m.out_features) for m in linears})))

    def forward(self, tokens: int, visible_keys: int, head_positions: int, adapters: bool) -> float:
        """FLOPs of a forward over `tokens` whose queries see `visible_keys` keys in all."""
        per_token = 2 * self.linear + (2 * self.lora if adapters else 0)
        return per_token * tokens + 4 * self.attention * visible_keys + 2 * self.head * head_positions

    def backward(self, tokens: int, visible_keys: int, head_positions: int) -> float:
        """FLOPs of the backward of a training forward (frozen base, LoRA and the inputs' gradients)."""
        return ((2 * self.linear + 4 * self.lora) * tokens + 8 * self.attention * visible_keys
                + 2 * self.head * head_positions)


def _keys(start: int, n: int) -> int:
    """Visible keys of n queries at positions start .. start + n - 1 under a causal mask."""
    return n * start + n * (n + 1) // 2


def pair_flops(shape: ModelShape, pair: EncodedPair, method: str, user_tokens: int) -> dict[str, float]:
    """Model FLOPs of one pair: {"step": one training step's share, "reference": its reference forward}.

    prlhf scores the prompt once per (user, prompt) and continues each response from its cache (prompt sharing);
    TRL runs chosen and rejected as two full rows. P-DPO adds the user's tokens to the prompt, and alpha < 1 scores
    everything a second time under the generic user. The reference (adapters off, no user tokens) is in the step
    for TRL's in-step variant and a one-off pass for the others."""
    p, responses = len(pair.prompt_ids), (len(pair.chosen_ids), len(pair.rejected_ids))
    if method.startswith("trl"):
        rows = [(p + r, _keys(0, p + r), r) for r in responses]  # (tokens, visible keys, head positions)
        train = sum(shape.forward(*row, adapters=True) + shape.backward(*row) for row in rows)
        reference = sum(shape.forward(*row, adapters=False) for row in rows)
        return {"step": train + (reference if method == "trl_dpo" else 0.0), "reference": reference}

    def shared(prefix: int, adapters: bool, backward: bool) -> float:
        segments = [(prefix, _keys(0, prefix), 1)] + [(r, _keys(prefix, r), r) for r in responses]
        return sum(shape.forward(*s, adapters=adapters) + (shape.backward(*s) if backward else 0.0) for s in segments)

    t = 0 if method == "prlhf_dpo" else user_tokens
    copies = 2 if method == "prlhf_pdpo_a05" else 1  # the user's and the generic user's
    return {"step": copies * shared(p + t, True, True), "reference": shared(p, False, False)}


def flops_per_pair(shape: ModelShape, pairs: Sequence[EncodedPair], methods: Sequence[str],
                   user_tokens: int) -> dict[str, dict[str, float]]:
    """Mean over the data set's pairs, per method."""
    out = {}
    for m in methods:
        each = [pair_flops(shape, p, m, user_tokens) for p in pairs]
        out[m] = {k: statistics.fmean(e[k] for e in each) for k in ("step", "reference")}
    return out


def matmul_rates(shape: ModelShape, tokens: int, dtype: torch.dtype, seconds: float = 1.0) -> dict[str, float]:
    """Sustained FLOP/s of `F.linear` on (tokens, in) x (in, out) for each of the model's linear shapes, in
    `dtype`: the median of timed calls after a warm-up, each shape run for about `seconds`."""
    rates = {}
    for k, n in shape.linears:
        x, w = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 5:
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
        rates[f"{tokens}x{k}x{n}"] = 2 * tokens * k * n / statistics.median(times)
    return rates


PROFILE_GROUPS = (("matmul", ("mm", "addmm", "bmm", "linear", "matmul")),
                  ("attention", ("attention", "sdpa", "flash")),
                  ("softmax / log-softmax", ("softmax",)),
                  ("optimizer", ("adam", "_foreach", "_fused")))


def profile_groups(step, steps: int = 1, top: int = 8) -> dict[str, dict[str, float]]:
    """Self CPU seconds per `step()` call, by kind of operator (matmul, attention, softmax, optimizer, the rest) and
    for the `top` operators, from torch's profiler over `steps` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    kinds = {name: 0.0 for name, _ in PROFILE_GROUPS} | {"other": 0.0}
    ops = {}
    for event in prof.key_averages():
        name = event.key.lower().removeprefix("aten::")
        kind = next((g for g, keys in PROFILE_GROUPS if any(k == name or k in name for k in keys)), "other")
        seconds = event.self_cpu_time_total / 1e6 / steps
        kinds[kind] += seconds
        ops[event.key] = seconds
    return {"by_kind": kinds, "top_operators": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:top])}
