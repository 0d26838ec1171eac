"""Tiny runs for the serving tests, and a server on a free 127.0.0.1 port for the duration of a test."""

from __future__ import annotations

from prlhf.serve.background import free_port, serving as running  # noqa: F401  (the tests' names)

# No warm-up: the random-init LM then answers each user's soft tokens differently, which the user tests need.
TINY = dict(sft_steps=0, epochs=1, max_steps=4, batch_size=4, user_tokens=2, threads=1, seed=0, lora_dropout=0.0)


def train_tiny_runs(root, names=("policy", "reward")) -> dict:
    """A 3-user length task and tiny runs on it: a P-DPO policy and a P-RM reward model."""
    from prlhf.config import TrainConfig
    from prlhf.data.tasks import build_length_task
    from prlhf.train.loop import train

    task = build_length_task(n_seen_users=3, n_unseen_users=1, n_prompts=40, train_pairs_per_user=12,
                             test_pairs_per_user=4, seed=0)
    task.write(root / "data")
    out = {}
    for name in names:
        out[name] = root / name
        extra = {"objective": "rm"} if name == "reward" else {}
        train(TrainConfig(data=str(root / "data" / "train.jsonl"), out=str(out[name]), **(TINY | extra)),
              show_progress=False)
    return out
