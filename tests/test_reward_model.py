"""P-RM: the Bradley-Terry loss with the alpha split (hand-computed), the reward head on the last real token,
training / save / load round trip, `prlhf eval`, `prlhf score`, best-of-n reranking and their errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, tiny_architecture

from prlhf.cli.main import main
from prlhf.config import ConfigError, TrainConfig
from prlhf.data.collate import collate_pairs
from prlhf.data.loading import load_records
from prlhf.data.tasks import build_style_task
from prlhf.data.tokenize import adds_bos, encode_records
from prlhf.evaluate.run_eval import evaluate_run
from prlhf.evaluate.scoring import RewardFunction, best_of_n, score_responses
from prlhf.losses import bradley_terry_loss, p_rm_loss
from prlhf.model.loading import add_lora, ensure_pad_token
from prlhf.model.reward import PersonalizedRewardModel
from prlhf.runs.directory import RunError, current_version, load_run
from prlhf.train.loop import train
from prlhf.users.models import build_user_model

SMALL = dict(sft_steps=20, epochs=1, max_steps=8, batch_size=8, user_tokens=2, threads=1, seed=0, report_to="none")


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand():
    out = bradley_terry_loss(torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0]))
    expected = [-math.log(sig(1.0)), math.log(2.0), -math.log(sig(-3.0))]  # 0.3133, 0.6931, 3.0486
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == [1.0, 0.0, -2.0]


def test_p_rm_alpha_split_by_hand():
    user_c, user_r = torch.tensor([2.0]), torch.tensor([0.5])
    gen_c, gen_r = torch.tensor([0.0]), torch.tensor([1.0])
    out, generic = p_rm_loss(user_c, user_r, gen_c, gen_r, alpha=0.25)
    expected = 0.25 * -math.log(sig(1.5)) + 0.75 * -math.log(sig(-1.0))  # 0.25 * 0.2014 + 0.75 * 1.3133
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert generic.losses.item() == pytest.approx(-math.log(sig(-1.0)), abs=1e-6)
    assert out.chosen_rewards.item() == 2.0  # the user's rewards are reported
    alone, none = p_rm_loss(user_c, user_r, None, None, alpha=1.0)
    assert none is None and alone.losses.item() == pytest.approx(-math.log(sig(1.5)), abs=1e-6)
    with pytest.raises(ValueError, match="generic"):
        p_rm_loss(user_c, user_r, None, None, alpha=0.5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reward_reads_the_last_real_token_whatever_the_padding(arch, tiny_tokenizer):
    base = tiny_architecture(arch, tiny_tokenizer)
    ensure_pad_token(tiny_tokenizer, base)
    d = base.get_input_embeddings().weight.shape[1]
    users = build_user_model("individual", 2, 2, d, input_embeddings=base.get_input_embeddings().weight, seed=0)
    rm = PersonalizedRewardModel(add_lora(base, r=4, alpha=8, dropout=0.0), users, int(adds_bos(tiny_tokenizer)),
                                 d).eval()
    from prlhf.data.schema import PreferenceRecord

    recs = [PreferenceRecord("a", "The cat.", "hello", "The quiet cat carried a map behind the school."),
            PreferenceRecord("b", "hello world", "a tiny corpus", "x")]
    pairs = encode_records(recs, tiny_tokenizer)
    batch = collate_pairs(pairs, torch.tensor([1, 2]), torch.tensor([0, 1]), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        together = rm(batch.input_ids, batch.attention_mask, None, batch.user_idx.repeat(2))
        for row in range(4):
            n = int(batch.attention_mask[row].sum())
            alone = rm(batch.input_ids[row:row + 1, :n], batch.attention_mask[row:row + 1, :n], None,
                       batch.user_idx.repeat(2)[row:row + 1])
            assert together[row].item() == pytest.approx(alone.item(), abs=1e-5)
    loss = rm(batch.input_ids, batch.attention_mask, None, batch.user_idx.repeat(2)).sum()
    loss.backward()
    assert rm.value_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None for p in rm.user_model.parameters())


def test_mean_pool_reads_the_mean_over_the_response_tokens(tiny_tokenizer):
    base = tiny_architecture("llama", tiny_tokenizer)
    ensure_pad_token(tiny_tokenizer, base)
    d = base.get_input_embeddings().weight.shape[1]
    users = build_user_model("individual", 2, 2, d, input_embeddings=base.get_input_embeddings().weight, seed=0)
    rm = PersonalizedRewardModel(add_lora(base, r=4, alpha=8, dropout=0.0), users, int(adds_bos(tiny_tokenizer)),
                                 d, pool="mean").eval()
    from prlhf.data.schema import PreferenceRecord

    recs = [PreferenceRecord("a", "The cat.", "hello there", "The quiet cat carried a map behind the school.")]
    batch = collate_pairs(encode_records(recs, tiny_tokenizer), torch.tensor([1]), torch.tensor([0]),
                          tiny_tokenizer.pad_token_id)
    user_idx = batch.user_idx.repeat(2)
    with torch.no_grad():
        rewards = rm(batch.input_ids, batch.attention_mask, batch.labels, user_idx)
        embeds, mask, labels = rm.insert_user_tokens(batch.input_ids, batch.attention_mask, batch.labels, user_idx)
        hidden = rm.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       output_hidden_states=True).hidden_states[-1]
        for row in range(2):  # chosen, rejected: by hand, the mean of the response positions only
            response = hidden[row][labels[row] != -100]
            assert 0 < len(response) < int(mask[row].sum())
            assert rewards[row].item() == pytest.approx(rm.value_head(response.mean(0)).item(), abs=1e-5)
    with pytest.raises(ValueError, match="labels"):
        rm(batch.input_ids, batch.attention_mask, None, user_idx)
    with pytest.raises(ConfigError, match="reward_pool"):
        TrainConfig(data="x", out="y", objective="rm", reward_pool="max").validate()


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory) -> Path:
    task = build_style_task(n_seen_users=4, n_unseen_users=1, train_pairs_per_user=16, test_pairs_per_user=4, seed=0)
    out = tmp_path_factory.mktemp("style")
    task.write(out)
    return out


@pytest.fixture(scope="module")
def rm_run(style_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "run"
    train(TrainConfig(data=str(style_dir / "train.jsonl"), out=str(out), objective="rm", **SMALL),
          show_progress=False)
    return out


@pytest.fixture(scope="module")
def policy_run(style_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("policy") / "run"
    train(TrainConfig(data=str(style_dir / "train.jsonl"), out=str(out), **SMALL), show_progress=False)
    return out


def test_rm_run_round_trips(rm_run, style_dir):
    assert (current_version(rm_run) / "value_head.safetensors").is_file()  # in the current version folder
    assert json.loads((rm_run / "run.json").read_text())["objective"] == "rm"
    # a reward model's outputs are rewards: logged under rewards/*, not as log-probs
    rows = [json.loads(line) for line in (rm_run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("rewards/accuracies" in r and not any(k.startswith("logps/") for k in r) for r in rows)
    a, b = load_run(rm_run), load_run(rm_run)
    assert isinstance(a.model, PersonalizedRewardModel)
    records = load_records(str(style_dir / "test.jsonl"))[:6]
    args = ([r.user_id for r in records], [r.prompt for r in records], [r.chosen for r in records])
    first, second = score_responses(a, *args), score_responses(b, *args)
    assert first == second and len(set(first)) > 1
    # the eval JSON is the reward's accuracy: the share of pairs where the chosen response scores higher
    result = evaluate_run(a, records)
    chosen = score_responses(a, *args)
    rejected = score_responses(a, args[0], args[1], [r.rejected for r in records])
    assert result["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / len(records))


def test_rm_config_errors(style_dir, tmp_path):
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(data="x", out="y", objective="ppo").validate()
    with pytest.raises(ConfigError, match="nll_weight"):
        TrainConfig(data="x", out="y", objective="rm", nll_weight=0.5).validate()


def test_score_and_rerank_commands(rm_run, policy_run, capsys):
    assert main(["score", "--run", str(rm_run), "--user", "user_01", "--prompt", "Write a note to the team.",
                 "--response", "Dear team, hello.", "--response", "hey team, hello."]) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 2 and all(math.isfinite(float(x)) for x in lines)
    assert main(["generate", "--run", str(policy_run), "--user", "user_01", "--prompt", "Write a note to the team.",
                 "--n", "4", "--rerank", str(rm_run), "--max-new-tokens", "8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["candidates"]) == 4
    assert doc["best_reward"] == max(c["reward"] for c in doc["candidates"])
    assert doc["best"] in [c["text"] for c in doc["candidates"]]
    # wrong kinds of runs: one-line errors
    assert main(["score", "--run", str(policy_run), "--user", "u", "--prompt", "p", "--response", "r"]) == 2
    assert "not a reward-model run" in capsys.readouterr().err
    assert main(["generate", "--run", str(rm_run), "--user", "u", "--prompt", "p"]) == 2
    assert "does not generate" in capsys.readouterr().err


def test_best_of_n_and_reward_function(rm_run, policy_run):
    policy, reward = load_run(policy_run), load_run(rm_run)
    ranked = best_of_n(policy, reward, "user_02", "Write a note to the team.", n=3, max_new_tokens=6, seed=1)
    assert len(ranked.candidates) == 3 and ranked.best_reward == max(r for _, r in ranked.candidates)
    fn = RewardFunction(str(rm_run))
    texts = [t for t, _ in ranked.candidates]
    rewards = fn(["Write a note to the team."] * 3, texts, user_id=["user_02"] * 3)
    assert rewards == pytest.approx([r for _, r in ranked.candidates], abs=1e-5)
    conversational = fn([[{"role": "user", "content": "Write a note to the team."}]] * 3,
                        [[{"role": "assistant", "content": t}] for t in texts], user_id=["user_02"] * 3)
    assert conversational == pytest.approx(rewards, abs=1e-5)
    with pytest.raises(ValueError, match="user_id"):
        fn(["p"], ["r"])
    with pytest.raises(RunError, match="not a reward-model run"):
        RewardFunction(str(policy_run))
