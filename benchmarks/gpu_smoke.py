"""GPU smoke test: train P-DPO on the tiny model on CUDA (bf16 autocast where supported), evaluate and generate
on the GPU, and check that cached and uncached personalized generation agree. Prints one JSON line.

    python benchmarks/gpu_smoke.py --out /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from prlhf.config import TrainConfig
from prlhf.data.tasks import build_length_task
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.runs.directory import load_run
from prlhf.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="/tmp/gpu_smoke")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    task = build_length_task(train_pairs_per_user=40, test_pairs_per_user=20, seed=0)
    paths = task.write(out / "data")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for kind in ("uniform", "individual"):
        start = time.time()
        summary = train(TrainConfig(data=str(paths["train"]), out=str(out / kind), user_model=kind, epochs=3),
                        show_progress=False)
        run = load_run(out / kind, device="cuda")
        ev = evaluate_run(run, task.test)
        tok = run.tokenizer
        prompts = [tok(r.prompt).input_ids for r in task.test[:8]]
        users = run.registry.indices([r.user_id for r in task.test[:8]])
        kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, max_new_tokens=48, do_sample=False)
        cached = run.model.generate(prompts, users, **kw)
        uncached = run.model.generate(prompts, users, use_cache=False, **kw)
        result[kind] = {"mean_user_accuracy": ev["mean_user_accuracy"],
                        "worst_user_accuracy": ev["worst_user_accuracy"],
                        "train_seconds": summary["train_seconds"], "total_seconds": round(time.time() - start, 1),
                        "cached_equals_uncached": cached == uncached,
                        "mixed_precision": "bf16" if torch.cuda.is_bf16_supported() else "no"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
