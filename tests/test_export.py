"""`prlhf export` on tiny trained runs: the merged model fed PromptEmbedder's embeddings (from the standalone copy in
the export) gives prlhf's own response log-probs and greedy tokens for a seen, an unknown and the generic user;
reward-model runs and folders in use are refused, leaving nothing behind."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from prlhf.cli.main import main
from prlhf.config import ConfigError, TrainConfig
from prlhf.data.collate import collate_pairs
from prlhf.data.loading import load_records
from prlhf.data.schema import PreferenceRecord
from prlhf.data.tokenize import adds_bos, encode_prompt, encode_records, prompt_text_with_user
from prlhf.evaluate.generation import generate_texts
from prlhf.model.tiny import build_tiny_model
from prlhf.runs.directory import RunError, load_run, resolve_run
from prlhf.safe_io import TMP_PREFIX, manifest_problem
from prlhf.serve import prompt_embeds
from prlhf.serve.export import embedding_scale, export_run, input_embedding_source, write_user_table
from prlhf.train.loop import train

TINY = dict(sft_steps=5, epochs=1, max_steps=4, batch_size=4, user_tokens=2, threads=1, seed=0, lora_dropout=0.0)
SEEN, UNKNOWN = "user_01", "no-such-user"
GENERIC = None  # the generic user itself: row 0, asked for by index
MAX_NEW = 12
MIN_NEW = 4  # the tiny model would often end at once for the generic user, which would compare nothing


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def run_dir(task_dir, root) -> Path:
    train(TrainConfig(data=str(task_dir / "train.jsonl"), out=str(root / "run"), **TINY), show_progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def exported(run_dir, root) -> Path:
    return export_run(run_dir, root / "out")


@pytest.fixture(scope="module")
def embedder(exported):
    """PromptEmbedder from the export's own copy of prompt_embeds.py, as a box without prlhf would use it."""
    spec = importlib.util.spec_from_file_location("exported_prompt_embeds", exported / "prompt_embeds.py")
    module = importlib.util.module_from_spec(spec)
    # no __pycache__ inside the export: test_export_files checks it against its manifest
    writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes
    return module.PromptEmbedder(exported)


@pytest.fixture(scope="module")
def merged(exported):
    return AutoModelForCausalLM.from_pretrained(exported / "model").eval()


def user_row(embedder, user: str | None) -> int:
    return embedder.generic_index if user is GENERIC else embedder.user_index(user)


def merged_logp(merged, embeds: torch.Tensor, response: list[int]) -> float:
    """Summed log-prob of `response`, the last len(response) rows of `embeds` (S, d), under the merged model."""
    with torch.no_grad():
        logits = merged(inputs_embeds=embeds[None]).logits[0]  # (S, V)
    start = embeds.shape[0] - len(response)
    logps = logits[start - 1:-1].log_softmax(-1)  # (R, V): position i predicts token i + 1
    return logps.gather(-1, torch.tensor(response)[:, None]).sum().item()


def merged_greedy(merged, embeds: torch.Tensor, tokenizer) -> list[int]:
    with torch.no_grad():
        out = merged.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0],
                              dtype=torch.long), max_new_tokens=MAX_NEW, min_new_tokens=MIN_NEW,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    row = out[0].tolist()  # only the new tokens: generate was given embeddings, no ids
    eos = tokenizer.eos_token_id
    return row[:row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("user", [SEEN, UNKNOWN, GENERIC], ids=["seen", "unknown", "generic"])
def test_merged_model_with_prompt_embeds_matches_prlhf(run_dir, exported, embedder, merged, task_dir, user):
    run = load_run(run_dir)
    records = load_records(task_dir / "test.jsonl")[:3]
    pairs = run.encode(records)
    row = user_row(embedder, user)
    assert row == (run.registry.index(user) if user is not GENERIC else 0)
    assert (row != 0) == (user == SEEN)
    # prlhf's own scoring path: chosen rows then rejected rows, each with the user's tokens
    batch = collate_pairs(pairs, torch.full((len(pairs),), row), torch.arange(len(pairs)), run.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = run.model(batch.input_ids, batch.attention_mask, batch.labels, batch.user_idx.repeat(2))  # (2B,)
    theirs = []
    for response_of in ("chosen_ids", "rejected_ids"):
        for rec, pair in zip(records, pairs):
            prompt = embedder(user, rec.prompt) if user is not GENERIC else embedder.embed_ids(
                embedder.ids(rec.prompt), row)
            assert embedder.ids(rec.prompt) == pair.prompt_ids  # tokenized as prlhf does
            assert prompt.shape == (len(pair.prompt_ids) + run.model.num_user_tokens, embedder.hidden_size)
            response = getattr(pair, response_of)
            theirs.append(merged_logp(merged, torch.cat([prompt, embedder.embed_tokens(response)]), response))
    theirs = torch.tensor(theirs, dtype=ours.dtype)
    print(f"max |log-prob difference| ({'generic' if user is GENERIC else user}): "
          f"{(ours - theirs).abs().max().item():.3g} of sums up to {ours.abs().max().item():.0f}")
    # float32 sums of ~400 differ by one ulp (3e-5) when merged weights round differently: float32's own tolerance
    torch.testing.assert_close(theirs, ours, rtol=1.3e-6, atol=1e-5)
    with torch.no_grad(), run.model.lm.disable_adapter():  # what a merge that lost the adapters would give
        assert (run.model(batch.input_ids, batch.attention_mask, batch.labels, batch.user_idx.repeat(2))
                - ours).abs().max() > 1e-2

    prompts = [rec.prompt for rec in records]
    ids = [embedder.ids(p) for p in prompts]
    expected = run.model.generate(ids, torch.full((len(ids),), row), run.tokenizer.pad_token_id,
                                  run.tokenizer.eos_token_id, max_new_tokens=MAX_NEW, min_new_tokens=MIN_NEW,
                                  do_sample=False)
    got = [merged_greedy(merged, embedder.embed_ids(i, row), embedder.tokenizer) for i in ids]
    print(f"greedy tokens: {got}")
    assert got == expected and all(len(t) >= MIN_NEW for t in got)
    if user is not GENERIC:  # prlhf's text path, as `prlhf generate` runs it
        texts = generate_texts(run, prompts, [user] * len(prompts), max_new_tokens=MAX_NEW,
                               min_new_tokens=MIN_NEW)
        assert texts == [run.tokenizer.decode(t, skip_special_tokens=True).strip() for t in got]


def test_the_merged_model_and_users_are_trained_values(run_dir, embedder, merged):
    """The round trip would prove little if the adapters were still zero or every user were the generic one."""
    base = dict(AutoModelForCausalLM.from_pretrained(run_dir / "base").named_parameters())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base[n])]
    assert changed and all("proj" in n for n in changed)  # the LoRA-adapted linear layers, nothing else
    seen = embedder.user_tokens(embedder.user_index(SEEN))
    assert seen.shape == (2, embedder.hidden_size) and not torch.equal(seen, embedder.user_tokens(0))


def test_export_files(run_dir, exported):
    run = load_run(run_dir)
    meta = json.loads((exported / "export.json").read_text())
    n, d = len(run.registry), run.model.user_model.hidden_size
    assert meta["format"] == prompt_embeds.EXPORT_FORMAT and meta["version"] == resolve_run(run_dir).version
    assert meta["run"] == str(run_dir.absolute())
    assert (meta["num_users"], meta["num_user_tokens"], meta["hidden_size"]) == (n, 2, d)
    assert meta["prefix_len"] == int(adds_bos(run.tokenizer)) == 1 and meta["use_user_text"] is True
    table = load_file(str(exported / "users.safetensors"))
    with torch.no_grad():
        assert torch.equal(table["embeddings"], run.model.user_model(torch.arange(n + 1)))  # (N+1, T_u, d)
    assert json.loads((exported / "users.json").read_text()) == run.registry.to_dict()
    assert (exported / "prompt_embeds.py").read_text() == Path(prompt_embeds.__file__).read_text()
    model = exported / "model"
    assert (model / "model.safetensors").is_file() and not (model / "adapter_config.json").exists()  # merged
    assert manifest_problem(exported) is None
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(TMP_PREFIX)]
    resolve_run(run_dir)  # the run itself is untouched (still matches its manifest)


def test_prompt_embeds_imports_no_prlhf():
    tree = ast.parse(Path(prompt_embeds.__file__).read_text())
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= {"__future__", "json", "os", "pathlib", "torch", "safetensors", "transformers"}


def test_user_table_is_written_in_chunks(run_dir, tmp_path):
    user_model = load_run(run_dir).model.user_model
    for rows in (1, 3, 100):  # 4 users with the generic one: 4 chunks, 2 uneven ones, 1
        write_user_table(tmp_path / f"t{rows}.safetensors", user_model, chunk_rows=rows)
        with torch.no_grad():
            assert torch.equal(load_file(str(tmp_path / f"t{rows}.safetensors"))["embeddings"],
                               user_model(torch.arange(user_model.num_users + 1)))


def test_prompt_layout_helpers(run_dir, embedder):
    tok = load_run(run_dir).tokenizer
    bos = adds_bos(tok)
    assert embedder.ids("Summarize: the cat.", "I like short answers") == encode_prompt(
        tok, prompt_text_with_user("Summarize: the cat.", "I like short answers"), bos)
    messages = [{"role": "user", "content": "Summarize: the quiet cat carried a map."}]
    pair = encode_records([PreferenceRecord(SEEN, messages, "A map.", "The cat carried a map.")], tok)[0]
    row = embedder.user_index(SEEN)
    assert torch.equal(embedder.chat(SEEN, messages), embedder.embed_ids(pair.prompt_ids, row))


def test_uniform_run_exports_without_user_tokens(task_dir, root, tmp_path):
    """A uniform user model has T_u = 0: the prompt embeddings are the prompt's alone, and still match prlhf."""
    run_dir = root / "uniform"
    train(TrainConfig(data=str(task_dir / "train.jsonl"), out=str(run_dir), **(TINY | {"user_model": "uniform",
                                                                                        "max_steps": 1})),
          show_progress=False)
    out = export_run(run_dir, tmp_path / "out")
    embedder = prompt_embeds.PromptEmbedder(out)
    run, merged = load_run(run_dir), AutoModelForCausalLM.from_pretrained(out / "model").eval()
    pair = run.encode(load_records(task_dir / "test.jsonl")[:1])[0]
    emb = embedder(SEEN, "Summarize: the cat.")
    assert emb.shape == (len(embedder.ids("Summarize: the cat.")), embedder.hidden_size)
    batch = collate_pairs([pair], run.registry.indices([SEEN]), torch.arange(1), run.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = run.model(batch.input_ids, batch.attention_mask, batch.labels, batch.user_idx.repeat(2))[0].item()
    theirs = merged_logp(merged, embedder.embed_ids(pair.prompt_ids + pair.chosen_ids, 1), pair.chosen_ids)
    assert abs(ours - theirs) < 1e-5


def test_reward_model_run_is_refused(task_dir, root, tmp_path):
    rm = root / "rm"
    train(TrainConfig(data=str(task_dir / "train.jsonl"), out=str(rm), objective="rm", **(TINY | {"sft_steps": 0,
                                                                                                 "max_steps": 1})),
          show_progress=False)
    with pytest.raises(RunError, match="reward-model run") as info:
        export_run(rm, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary folder


def test_folders_in_use_are_refused_and_left_alone(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty") as info:
        export_run(run_dir, out)
    assert "\n" not in str(info.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export_run(run_dir, tmp_path / "file")
    with pytest.raises(ConfigError, match="inside the run directory"):
        export_run(run_dir, run_dir / "versions" / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]
    resolve_run(run_dir)


def test_embedding_scale():
    class Scaled(nn.Embedding):  # Gemma 3's layout: the rows times a fixed scale on lookup
        def __init__(self):
            super().__init__(10, 4)
            self.register_buffer("embed_scale", torch.tensor(2.0), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1

    assert embedding_scale(nn.Embedding(10, 4)) is None
    assert embedding_scale(Scaled()) == 2.0
    with pytest.raises(RunError, match="Shifted"):
        embedding_scale(Shifted(10, 4))


def test_embeddings_get_a_file_of_their_own_when_not_found_by_name(tiny_tokenizer, tmp_path):
    model = build_tiny_model(tiny_tokenizer, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    (tmp_path / "model").mkdir()  # nothing saved there: the name is not found
    source = input_embedding_source(model, tmp_path)
    assert source == {"file": "input_embeddings.safetensors", "tensor": "weight", "scale": None}
    assert torch.equal(load_file(str(tmp_path / source["file"]))["weight"], model.get_input_embeddings().weight)


def test_cli_export(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is replaced
    assert main(["export", "--run", str(run_dir), "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "3 user(s)" in printed
    assert prompt_embeds.PromptEmbedder(out)(SEEN, "Summarize: the cat.").shape[1] > 0


def test_a_version_folder_exports_that_version(run_dir, tmp_path):
    version = resolve_run(run_dir).files  # RUN/versions/vN, as `--run` takes it to reach an earlier version
    out = export_run(version, tmp_path / "out")
    meta = json.loads((out / "export.json").read_text())
    assert (meta["version"], meta["run"]) == (version.name, str(run_dir.absolute()))
