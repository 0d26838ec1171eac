"""Scoring responses with a personalized reward model (P-RM run): for `prlhf score`, best-of-n reranking and as
the reward function of an external RL trainer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


from prlhf.data.schema import PreferenceRecord
from prlhf.model.scoring import reward_scores
from prlhf.runs.directory import LoadedRun, RunError, load_run


def require_reward_run(run: LoadedRun) -> LoadedRun:
    if not getattr(run.model, "is_reward_model", False):
        raise RunError(f"{run.path}: not a reward-model run (train it with --objective rm)")
    return run


def score_responses(run: LoadedRun, user_ids: Sequence[str], prompts: Sequence[str], responses: Sequence[str],
                    user_texts: Sequence[str | None] | None = None, batch_size: int = 32) -> list[float]:
    """r(x, y, e_u) for each (user, prompt, response) row; users the run has not seen get the generic e_0."""
    require_reward_run(run)
    if not len(user_ids) == len(prompts) == len(responses):
        raise ValueError("user_ids, prompts and responses must have the same length")
    texts = user_texts or [None] * len(prompts)
    records = [PreferenceRecord(u, p, r, r, t) for u, p, r, t in zip(user_ids, prompts, responses, texts)]
    return reward_scores(run.model, run.encode(records), run.registry, run.tokenizer.pad_token_id,
                         batch_size).tolist()


@dataclass
class Ranked:
    best: str
    best_reward: float
    candidates: list[tuple[str, float]]  # in sampling order


def best_of_n(policy: LoadedRun, reward: LoadedRun, user_id: str, prompt: str, n: int, max_new_tokens: int = 64,
              seed: int = 0, user_text: str | None = None, **generate_kwargs) -> Ranked:
    """Sample n responses from `policy` for the user (one batched, cached generate call) and keep the one the
    user's reward ranks highest. The policy may be personalized or plain (a uniform run)."""
    from prlhf.evaluate.generation import generate_texts

    candidates = generate_texts(policy, [prompt] * n, [user_id] * n, max_new_tokens=max_new_tokens,
                                do_sample=True, seed=seed, user_texts=[user_text] * n if user_text else None,
                                **generate_kwargs)
    rewards = score_responses(reward, [user_id] * n, [prompt] * n, candidates,
                              [user_text] * n if user_text else None)
    top = max(range(n), key=lambda i: rewards[i])
    return Ranked(candidates[top], rewards[top], list(zip(candidates, rewards)))


class RewardFunction:
    """A P-RM run as a reward function in the shape TRL's GRPOTrainer / RLOOTrainer expect:
    `fn(prompts, completions, user_id=[...], **dataset_columns) -> list[float]`.

        from prlhf.evaluate.scoring import RewardFunction
        trainer = GRPOTrainer(model=..., reward_funcs=RewardFunction("runs/p-rm"), train_dataset=ds_with_user_id)
    """

    def __init__(self, run_dir: str, device: str = "cpu"):
        self.run = require_reward_run(load_run(run_dir, device=device))
        self.__name__ = f"prlhf_rm:{run_dir}"  # trainers log rewards under the function's name

    def __call__(self, prompts, completions, user_id=None, user_text=None, **_) -> list[float]:
        if user_id is None:
            raise ValueError("the dataset needs a user_id column (unknown ids get the generic user)")
        as_text = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        prompt_text = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]
        return score_responses(self.run, list(user_id), prompt_text, as_text, user_text)
