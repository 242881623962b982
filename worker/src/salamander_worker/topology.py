"""Where a training process is: its rank, the world, how often it has been restarted.

The values come from the environment that torch.distributed.elastic's agent sets for each
worker process (``RANK``, ``WORLD_SIZE``, ``TORCHELASTIC_RESTART_COUNT``...) and from the
Salamander variables in :mod:`salamander.wire`. Outside an agent (a plain ``python train.py``)
the script runs as a world of one.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.distributed as dist

from salamander import wire


@dataclass(frozen=True)
class WorkerContext:
    """One training process's place in the job. ``0 <= rank < world_size`` always holds."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    restart_count: int
    job: str
    run_id: str
    backend: str
    device: torch.device

    @property
    def is_leader(self) -> bool:
        """True on the one process (global rank 0) that speaks for the job."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def default_backend() -> str:
    """NCCL when this process can see a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def context() -> WorkerContext:
    """Read this process's place in the job from its environment."""
    backend = default_backend()
    local_rank = _env_int("LOCAL_RANK", 0)
    if backend == "nccl":
        device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    else:
        device = torch.device("cpu")
    return WorkerContext(
        rank=_env_int("RANK", 0),
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=local_rank,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
        node_rank=_env_int("GROUP_RANK", 0),
        restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
        job=os.environ.get(wire.ENV_JOB, "local/standalone"),
        run_id=os.environ.get(wire.ENV_RUN_ID, ""),
        backend=backend,
        device=device,
    )


_ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
_hook_installed = False


def _record_exception(exc: BaseException, tb: TracebackType | None) -> None:
    """Write ``exc`` to torch elastic's error file, as its ``@record`` decorator would, unless the
    file already holds a record (``@record`` itself wrote one, nearer the cause)."""
    path = os.environ.get(_ERROR_FILE_ENV, "")
    if not path or (os.path.isfile(path) and os.path.getsize(path) > 0):
        return
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    try:
        raise exc  # the handler formats the exception being handled (sys.exc_info())...
    except BaseException:  # noqa: BLE001 - exactly exc
        exc.__traceback__ = tb  # ... with its own traceback, without this frame
        get_error_handler().record_exception(exc)
    finally:
        exc.__traceback__ = tb


def install_excepthook() -> None:
    """Make an uncaught exception reach torch elastic's agent with its type and message
    (``ProcessFailure.error_file_data``), for any script, not only those decorated with
    ``@record``. Installed once per process; the previous hook still prints the traceback. Under
    an elastic agent with a process group, the process then exits at once (see the hook)."""
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        try:
            _record_exception(exc, tb)
        except Exception:  # noqa: BLE001, S110 - recording is best effort; the traceback still prints
            pass
        previous(exc_type, exc, tb)
        if os.environ.get("TORCHELASTIC_ERROR_FILE") and dist.is_available() and dist.is_initialized():
            # The rank has failed and its agent restarts the group anyway: exit now rather than
            # tear down a process group whose peers may be blocked (seconds, or forever), so the
            # failure is detected at once. Output is flushed first; atexit handlers do not run.
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(1)

    sys.excepthook = hook
    _hook_installed = True


def init_distributed(timeout_s: float = 300.0) -> WorkerContext:
    """Join the process group (gloo or NCCL) when running under an agent, and return the context.

    Safe to call twice. With ``WORLD_SIZE`` unset or 1 and no ``MASTER_ADDR`` it does not
    create a group, so the same script runs standalone. Installs :func:`install_excepthook`.
    """
    install_excepthook()
    ctx = context()
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend=ctx.backend, timeout=datetime.timedelta(seconds=timeout_s))
    return ctx
