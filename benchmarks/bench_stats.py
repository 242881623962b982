"""Summaries shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import socket
import statistics


def spread(values: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile, and count of ``values`` (not empty)."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p10": ordered[len(ordered) // 10],
            "p90": ordered[(len(ordered) * 9) // 10], "n": len(ordered)}


def machine() -> str:
    """The machine a result came from, e.g. "16 cores, x86_64, NVIDIA H100 80GB HBM3"."""
    try:
        import torch
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001 - a description only
        gpu = "GPU unknown"
    return f"{os.cpu_count()} cores, {platform.machine()}, {gpu}"


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (``VmHWM``: unlike ``ru_maxrss``, which Linux
    carries over from the parent through fork and exec, it starts afresh in every process)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
