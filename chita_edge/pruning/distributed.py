"""Where pruning runs: ``--device`` (CPU or a CUDA GPU) and several processes with ``torch.distributed``.

Several processes are started by torchrun (``torchrun --nproc-per-node N -m chita_edge.cli prune ...``, or
``chita-edge prune ... --workers N``, which runs ``python -m torch.distributed.run`` itself); they join one process
group (gloo on CPU, nccl on GPU). What is split and gathered:

- the rows of G: rank r computes the contiguous rows ``row_range(n, r, size)`` with the sample indices of the
  single-process run, and ``all_gather`` gives every rank the whole G;
- the block solves of block mode: block i is solved by rank ``i % size``; the disjoint results are summed
  (``all_reduce``), which is exact since each weight has one non-zero term.

Everything else (the global CHITA solve, the safeguard, BatchNorm re-estimation, the re-fit) runs on every rank on
identical inputs, so every rank ends with the same weights as one process would; only rank 0 writes the output
and shows progress.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, RuntimeFailure
from chita_edge.core.io import atomic_write_text
from chita_edge.pruning.gradients import collect_gradients
from chita_edge.pruning.layers import PrunableParam

DEVICES = ("auto", "cpu", "cuda")
EXIT_DIR_ENV = "CHITA_EDGE_EXIT_DIR"  # set by launch(): each rank records its exit code there


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (BadInput without a GPU) or ``auto`` (cuda when PyTorch sees one); under torchrun each
    process of a host takes the GPU of its LOCAL_RANK (nccl needs one GPU per process: ``auto`` stays on the CPU,
    ``cuda`` is refused, when a host runs more processes than it has GPUs)."""
    if name not in DEVICES:
        raise BadInput(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if name == "cuda" and gpus == 0:
        raise BadInput("--device cuda: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                       "use --device cpu or --device auto")
    if name == "cuda" and per_host > gpus:
        raise BadInput(f"--device cuda: {per_host} processes on this host but {gpus} GPU(s); one GPU per process "
                       f"(--workers {gpus} or fewer), or --device cpu")
    if name == "cpu" or gpus == 0 or per_host > gpus:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def launched() -> bool:
    """True in a process started by torchrun for a job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def world() -> tuple[int, int]:
    """(rank, number of processes) of the joined process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes outputs and shows progress (rank 0)."""
    return world()[0] == 0 and launch_rank() == 0


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join torchrun's process group when launched by it (gloo on CPU, nccl on CUDA) and leave it at the end; a
    no-op in a single process or when a group is already joined."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    if not dist.is_available():
        raise RuntimeFailure("torchrun started several processes but this PyTorch has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------- split and gather
def row_range(n: int, rank: int, size: int) -> range:
    """Rank ``rank``'s contiguous share of n rows (ceil(n / size) rows; the last ranks may get fewer or none)."""
    c = math.ceil(n / size)
    return range(min(rank * c, n), min((rank + 1) * c, n))


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The n rows whose share ``row_range(n, rank, size)`` each rank holds in ``local``, on every rank."""
    rank, size = world()
    if size == 1:
        return local
    c = math.ceil(n / size)
    shard = local
    if local.shape[0] < c:  # equal shards for the collective: pad the short ones with zero rows (cut off below)
        shard = torch.cat([local, local.new_zeros((c - local.shape[0], *local.shape[1:]))])
    full = local.new_empty((c * size, *local.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name from torch 2.1x
    gather(full, shard.contiguous())
    return full[:n]


def collect_gradients_split(model: nn.Module, params: list[PrunableParam], x: torch.Tensor, y: torch.Tensor, *,
                            n: int, **kwargs) -> torch.Tensor:
    """``collect_gradients`` with its rows split over the process group and gathered: the same G on every rank as
    one process computes (one process: exactly ``collect_gradients``)."""
    rank, size = world()
    if size == 1:
        return collect_gradients(model, params, x, y, n=n, **kwargs)
    local = collect_gradients(model, params, x, y, n=n, rows=row_range(n, rank, size), **kwargs)
    return gather_rows(local, n)


def solve_split(blocks: Sequence[slice], solve: Callable[[slice], torch.Tensor | None],
                like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``like``, zero except ``out[b] = solve(b)`` for each block (None: leave it zero). Block i
    is solved by rank ``i % size``; the ranks' disjoint results are summed, so every rank gets every block."""
    rank, size = world()
    out = torch.zeros_like(like)
    for i, b in enumerate(blocks):
        if i % size == rank:
            wb = solve(b)
            if wb is not None:
                out[b] = wb
    if size > 1:
        dist.all_reduce(out)
    return out


# ----------------------------------------------------------------------------------------------- devices
def data_on(data: Dataset, device: torch.device) -> Dataset:
    """The data set with its tensors on ``device`` (the same object on its own device)."""
    if data.x_train.device == device:
        return data
    return replace(data, x_train=data.x_train.to(device), y_train=data.y_train.to(device),
                   x_test=data.x_test.to(device), y_test=data.y_test.to(device))


@contextmanager
def model_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` moved to ``device`` for the block, and back to the CPU afterwards (also on errors)."""
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


# ---------------------------------------------------------------------------------------------- launcher
def launch(module: str, args: Sequence[str], workers: int) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node WORKERS -m MODULE ARGS`` and return its
    exit code; when it fails, the exit code of the first rank that failed on its own (not stopped by torchrun)."""
    if launched():
        raise BadInput("--workers: this process is already one of torchrun's; leave out --workers under torchrun")
    if workers < 1:
        raise BadInput(f"--workers {workers}: expected >= 1")
    with tempfile.TemporaryDirectory(prefix="chita-edge-ranks-") as codes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", module, *args]
        # the cores shared out between the processes (torchrun's own default is 1 thread, with a warning banner)
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        proc = subprocess.Popen(cmd, env={"OMP_NUM_THREADS": threads, **os.environ, EXIT_DIR_ENV: codes})
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the ranks too; SIGTERM (turned into this by the CLI) did not
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        if rc == 0:
            return 0
        ranked = sorted((int(p.stem), int(p.read_text())) for p in Path(codes).glob("*.code"))
        own = [c for _, c in ranked if c not in (0, 130)] or [c for _, c in ranked if c != 0]
        return own[0] if own else rc


def record_exit(code: int) -> None:
    """Under ``launch``: write this rank's exit code where the launcher reads it (nothing otherwise)."""
    where = os.environ.get(EXIT_DIR_ENV)
    if where and launched():
        atomic_write_text(Path(where) / f"{launch_rank()}.code", str(code))


__all__ = ["DEVICES", "collect_gradients_split", "data_on", "gather_rows", "is_main", "launch", "launch_rank",
           "launched", "model_on", "process_group", "record_exit", "resolve_device", "row_range", "solve_split",
           "world"]
