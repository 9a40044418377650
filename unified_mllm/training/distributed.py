"""Process-group set-up for one process (``python train_stage.py``) or many (``deepspeed``/``torchrun``)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch

STALE_BUILD_LOCK_S = 600.0
"""A torch-extension build lock older than this is left by a killed build (DeepSpeed's ops compile in 35–90 s)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA); returns (rank, world_size).

    A plain ``python train_stage.py`` gets single-process defaults for RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT, so DeepSpeed does not go looking for MPI.
    """
    use_interpreter_tools()
    import deepspeed

    for line in clear_stale_build_locks():
        print(f"[init_distributed] {line}", file=sys.stderr, flush=True)
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)
    import torch.distributed as dist

    _unlink_shm_buffer(dist)
    return dist.get_rank(), dist.get_world_size()


def use_interpreter_tools() -> None:
    """Put this interpreter's ``bin`` folder first on PATH, as an activated virtual environment has it.

    torch builds DeepSpeed's CPU ops with the first ``ninja`` on PATH. The virtual environment's (pip's ninja) and the
    system's record a build differently, so runs through ``.venv/bin/python`` (the quickstart, the launcher) and runs
    from an activated environment each found the other's build stale and compiled the op again — 35–60 s at the start
    of a stage, every time the two alternated (NOTES.md, session 18)."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")


def build_cpu_ops() -> str:
    """Build (or find built) DeepSpeed's shared-memory all-reduce op, which every CPU run's initialisation loads: the
    set-up script calls this, so the first training stage does not spend its first half-minute compiling."""
    use_interpreter_tools()
    if torch.cuda.is_available():
        return "CUDA: DeepSpeed's CPU communication op is not used"
    from deepspeed.accelerator import get_accelerator

    for line in clear_stale_build_locks():
        print(f"[build_cpu_ops] {line}", file=sys.stderr, flush=True)
    import deepspeed.ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return "DeepSpeed does not use its CPU shared-memory op here (not compatible); nothing to build"
    start = time.time()
    builder.load(verbose=False)
    return f"DeepSpeed's {builder.NAME} op ready in {extensions_root()} ({time.time() - start:.0f} s)"


def extensions_root() -> Path:
    """Where torch builds JIT extensions such as DeepSpeed's CPU ops: ``TORCH_EXTENSIONS_DIR``, else its cache."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(root: Path | None = None, now: float | None = None) -> list[str]:
    """Remove the build locks that a killed build left behind, and say which; name the recent ones.

    torch builds an extension (DeepSpeed's shared-memory all-reduce op at the first initialisation, cpu_adam for
    optimizer offload) under a ``lock`` file that the next process waits on, polling, without a word and without
    end. A run killed while compiling (Ctrl-C in the first minute) leaves the file, and every later run on the
    machine then hangs at start-up. A lock older than :data:`STALE_BUILD_LOCK_S` is removed; a younger one may be
    another run's build in progress, so it is only named, with the fix, in case the run then waits.
    """
    root = root or extensions_root()
    now = time.time() if now is None else now
    lines = []
    for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
        try:
            age = now - lock.stat().st_mtime
            if age > STALE_BUILD_LOCK_S:
                lock.unlink()
                lines.append(f"removed {lock}: a build lock left {age / 60:.0f} min ago by a build that was killed")
            else:
                lines.append(f"{lock} is {age:.0f} s old: another process is building this op; if none is "
                             f"(a build was just killed) and this run waits, delete the file")
        except FileNotFoundError:
            pass  # the build finished meanwhile
    return lines


def shm_buffer_path(rank: int) -> str:
    """Where DeepSpeed's CPU all-reduce op keeps this rank's shared-memory segment (its naming, ``shm.cpp``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_buffer(dist) -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce segment once every rank has mapped it.

    DeepSpeed (0.19) creates a 66 MB segment per process in /dev/shm at initialisation when all ranks are on one
    machine (the launcher sets LOCAL_SIZE) and never unlinks it, so every such CPU run, finished or killed, leaves
    its segments behind in RAM until reboot (259 of them, 17 GB of a 24 GB machine, after a few days of runs). All
    ranks map every segment inside ``init_distributed``; after a barrier the names can go, the mappings stay valid,
    and the memory is freed when the last process exits.
    """
    if dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.unlink(shm_buffer_path(dist.get_rank()))
    except FileNotFoundError:
        pass  # CUDA, or the op was not built: nothing was created


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def finish(exit_code: int) -> None:
    """End the process cleanly: flush, tear down the process group, exit without C++ static destructors.

    Multi-process CPU runs under the DeepSpeed launcher can abort at interpreter exit ("terminate called without
    an active exception"); leaving through ``os._exit`` after the group is destroyed avoids it.
    """
    import torch.distributed as dist

    sys.stdout.flush()
    sys.stderr.flush()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if world > 1:
        os._exit(exit_code)
    sys.exit(exit_code)


if __name__ == "__main__":  # python -m unified_mllm.training.distributed --build-cpu-ops (scripts/setup_env.sh)
    if sys.argv[1:] != ["--build-cpu-ops"]:
        sys.exit("usage: python -m unified_mllm.training.distributed --build-cpu-ops")
    print(f"[setup] {build_cpu_ops()}")
