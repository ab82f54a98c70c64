"""Several processes, one run (`accelerate launch -m flux2_train train`, or `--num-gpus N`).

Each process trains on its share of every step's micro-batches and accelerate's DDP
averages the LoRA gradients, so N processes train what one process would with N times
the gradient accumulation. The main process alone writes the run folder, checkpoints,
LoRA files and logs. Without a launcher (the CLI on one GPU, ComfyUI) no process group
is started and every call here is free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: this trainer runs on cpu, cuda or cuda:N (one GPU), or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def launched_processes() -> int:
    """How many processes the launcher started (torchrun and accelerate launch set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes; "
                          "start several processes with `accelerate launch` or --num-gpus N") from None


@dataclass
class World:
    """This process's place in the run: rank, process count, and the collectives the loop needs."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device, allowed: bool = True) -> "World":
        """The launcher's process group (gloo on the CPU, NCCL on GPUs), or a world of one.

        A host that trains in one process whatever its environment says (ComfyUI) passes
        `allowed=False`.
        """
        if not allowed or launched_processes() == 1:
            return cls()
        from accelerate import PartialState

        check_launch_config()
        if device.type == "cuda":
            local, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= visible:
                raise ConfigError(f"process {local} on this machine has no GPU of its own: {visible} visible, "
                                  f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes started here; launch "
                                  f"{visible} (--num-gpus {visible}, or accelerate launch --num_processes {visible})")
            # Before anything touches the GPU: "cuda" means this process's own card from here on.
            torch.cuda.set_device(local)
        state = PartialState(cpu=device.type == "cpu")
        if state.num_processes == 1:
            return cls()
        return cls(state.process_index, state.num_processes, state.local_process_index)

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on: its own GPU where the run has several."""
        if self.size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def share(self, obj):
        """The main process's `obj`, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def smallest(self, value: int | None, device: torch.device) -> int | None:
        """The smallest `value` over the processes, so that every process plans the same run."""
        if self.size == 1 or value is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over the processes (one small all-reduce)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def accumulation(self, configured: int, keep_effective_batch: bool) -> int:
        """Micro-batches per process and step: the configured count, or its share of it."""
        return accumulation_per_process(configured, self.size, keep_effective_batch)


def accumulation_per_process(configured: int, processes: int, keep_effective_batch: bool) -> int:
    """--gradient-accumulation per process: as configured, or with --keep-effective-batch its share."""
    if not keep_effective_batch or processes == 1:
        return configured
    if configured % processes:
        raise ConfigError(
            f"--keep-effective-batch divides --gradient-accumulation ({configured}) among {processes} "
            f"processes, and it does not divide evenly; use a multiple of {processes}, or drop "
            "--keep-effective-batch to train with a larger effective batch")
    return configured // processes


def check_launch_config() -> None:
    """Refuse an accelerate config that asks for what the trainer decides itself.

    `accelerate launch` passes its config to the processes as ACCELERATE_* variables. The
    trainer spreads the model itself (DDP or FSDP, --multi-gpu) and sets the precision from
    --dtype, so a config for DeepSpeed or accelerate's own FSDP would wrap the model twice.
    """
    for variable, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "accelerate's FSDP"),
                           ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"the accelerate config asks for {what} ({variable}); the trainer spreads the model itself: "
                "choose with --multi-gpu ddp|fsdp|auto and launch with --num-gpus N, or with `accelerate launch "
                "--multi_gpu --num_processes N -m flux2_train train ...` (a config with distributed_type MULTI_GPU)")


def check_precision(mixed_precision: str) -> None:
    """Refuse an accelerate config whose mixed precision differs from the one --dtype gives."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launched_processes() > 1 and asked not in ("no", mixed_precision):
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(asked, asked)
        raise ConfigError(f"the accelerate config sets mixed_precision {asked}, and --dtype trains with "
                          f"{mixed_precision}; pass --dtype {dtype}, or launch with --mixed_precision no "
                          "(the trainer sets the precision from --dtype)")


def lost_a_process(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process is gone."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return any(sign in text for sign in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer"))


def leave() -> None:
    """End this process's part in the process group (before exit, so gloo and NCCL shut down cleanly)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
