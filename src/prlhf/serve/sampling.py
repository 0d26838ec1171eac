"""Next-token choice per row of a batch: each row has its own temperature, top-p and random stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # decode max_tokens whatever the model says (benchmarks)


def row_generators(seed: int | None, n: int) -> list[torch.Generator]:
    """n independent streams: from `seed` (reproducible, OpenAI's `seed`) or from fresh OS entropy."""
    parent = torch.Generator()
    parent.manual_seed(seed) if seed is not None else parent.seed()
    return [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2 ** 62, (n,), generator=parent)]


def next_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) token ids: argmax for temperature-0 rows, else a draw from the
    temperature-scaled distribution cut to its top-p nucleus, with the row's own generator."""
    tokens = logits.argmax(-1)
    sampled = [i for i, s in enumerate(samplings) if s.temperature > 0]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([samplings[i].temperature for i in sampled], device=logits.device)
    probs = torch.softmax(logits[rows].float() / temps[:, None], dim=-1)  # (S, V)
    top_p = torch.tensor([samplings[i].top_p for i in sampled], device=logits.device)
    if (top_p < 1).any():
        probs = nucleus(probs, top_p)
    for j, i in enumerate(sampled):
        tokens[i] = torch.multinomial(probs[j].cpu(), 1, generator=generators[i]).to(tokens.device)[0]
    return tokens


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose mass reaches top_p (the top token always)."""
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (S, V)
    keep_sorted = mass_before < top_p[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)
