"""Multi-process launches (`accelerate launch --multi_gpu --num_processes N`, `torchrun`) on any machine."""

from __future__ import annotations

import os

import torch

from prlhf.config import ConfigError


def cpu_processes() -> bool:
    """True for a multi-process launch on a machine without CUDA.

    Accelerate then needs `cpu=True` to set up gloo data parallelism (otherwise every process would train alone
    as if it were the only one); `accelerate launch --cpu --num_processes N` only starts N processes through
    MPI (`--mpirun_hostfile`), so on CPU we launch with torchrun (`--multi_gpu`) and pick CPU here.
    """
    return launched_processes() > 1 and not torch.cuda.is_available()


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun) started: 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def allow_precision_change(mixed_precision: str) -> None:
    """Accelerate keeps one precision per process and refuses a second Accelerator with another one. In a single
    process (a notebook, or a bench that trains several models in turn) a new run may choose again, so the
    previous run's state is dropped; a launched multi-process job keeps what its launcher set up."""
    from accelerate.state import AcceleratorState

    if launched_processes() > 1 or not AcceleratorState._shared_state:
        return
    if AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state()  # accelerate's own tests reset it this way; there is no public call


def start_accelerator(**kwargs):
    """Accelerator(**kwargs), refusing in one line what Accelerate would do with FSDP on a machine without GPUs (or
    another accelerator): stop with a RuntimeError (sync_module_states, as in configs/fsdp.yaml), or, without it,
    set up plain CPU data parallelism (cpu=True) under an FSDP config, which would silently not shard anything."""
    from accelerate import Accelerator, DistributedType

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    hint = "Accelerate runs FSDP on GPUs or other accelerators only; on CPUs train data-parallel (configs/ddp_cpu.yaml)"
    try:
        accelerator = Accelerator(**kwargs)
    except RuntimeError as exc:
        if not fsdp:
            raise
        raise ConfigError(f"FSDP could not start ({exc}): {hint}") from None
    if fsdp and launched_processes() > 1 and accelerator.distributed_type != DistributedType.FSDP:
        raise ConfigError(f"FSDP was asked for but Accelerate set up {accelerator.distributed_type.value}: {hint}")
    return accelerator
