"""One line on where a benchmark ran: results are compared across machines and library versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch


def cpu_model() -> str:
    """The CPU's name and the matrix extensions that set the bf16 peak (AMX, AVX-512 BF16), where Linux says:
    sessions land on different hosts, and a bf16 matmul runs three times faster with AMX."""
    try:
        info = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extensions = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return name + (f" ({', '.join(extensions)})" if extensions else "")


def machine_summary() -> str:
    """CPU or GPU, Python and the versions that change numbers (a GGUF base is converted by transformers)."""
    libs = []
    for name in ("transformers", "peft", "accelerate"):
        try:
            libs.append(f"{name} {version(name)}")
        except PackageNotFoundError:  # run from a source tree without the package metadata
            continue
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()} {os.cpu_count()} cpus ({cpu_model()}){gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, " + ", ".join(libs))
