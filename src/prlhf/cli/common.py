"""Shared CLI plumbing: one-line errors, logging, dataclass-driven flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import warnings

from prlhf.config import field_type, load_config_file


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    for name in ("transformers", "accelerate", "peft", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices from inside transformers/PEFT are not actionable for a prlhf user.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.|peft\.")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def set_threads(n: int) -> None:
    """torch's CPU threads (0 leaves torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


def add_dataclass_flags(parser: argparse.ArgumentParser, cfg_cls, skip: tuple[str, ...] = (),
                        only: tuple[str, ...] | None = None, defaults: dict[str, str] | None = None) -> None:
    """One --flag per config field (or per field in `only`), with the field's help; defaults stay None so a config
    file, or a benchmark's own defaults (described by `defaults`: field -> text for --help), can fill them."""
    for f in dataclasses.fields(cfg_cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        t = field_type(cfg_cls, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {(defaults or {}).get(f.name, f.default)})"
        if t is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=t, default=None, metavar=f.name.upper(), help=help_text)


def config_from_args(cfg_cls, args: argparse.Namespace):
    """defaults < --config FILE.yaml < explicit flags."""
    values = load_config_file(cfg_cls, args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(cfg_cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cfg_cls(**values)
