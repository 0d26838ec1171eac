"""One line on where a benchmark ran: results are compared across machines and library versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch


def machine_summary() -> str:
    """CPU or GPU, Python and the versions that change numbers (a GGUF base is converted by transformers)."""
    libs = []
    for name in ("transformers", "peft", "accelerate"):
        try:
            libs.append(f"{name} {version(name)}")
        except PackageNotFoundError:  # run from a source tree without the package metadata
            continue
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()} {os.cpu_count()} cpus{gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, " + ", ".join(libs))
