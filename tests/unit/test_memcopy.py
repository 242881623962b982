"""The agent's choice of glibc's streaming-store threshold for training processes."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest

from salamander_worker import memcopy

OURS = f"{memcopy.TUNABLE}=0x100000"


def choose(env: dict[str, str], machine: str = "x86_64", libc: str = "glibc") -> str | None:
    return memcopy.tunables(env, machine=machine, libc=libc)


def test_sets_the_threshold_to_the_snapshot_piece() -> None:
    assert memcopy.THRESHOLD == 1 << 20
    assert choose({}) == OURS


def test_keeps_other_tunables_in_order() -> None:
    assert choose({"GLIBC_TUNABLES": "glibc.malloc.check=1:glibc.malloc.tcache_count=0"}) == \
        f"glibc.malloc.check=1:glibc.malloc.tcache_count=0:{OURS}"
    assert choose({"GLIBC_TUNABLES": "glibc.malloc.check=1:"}) == f"glibc.malloc.check=1:{OURS}"
    assert choose({"GLIBC_TUNABLES": ""}) == OURS


def test_a_threshold_the_user_chose_is_kept() -> None:
    assert choose({"GLIBC_TUNABLES": f"glibc.malloc.check=1:{memcopy.TUNABLE}=0x4000000"}) is None


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_can_be_switched_off(value: str) -> None:
    assert choose({"SALAMANDER_STREAMING_COPIES": value}) is None


@pytest.mark.parametrize(("machine", "libc"), [("aarch64", "glibc"), ("x86_64", ""), ("arm64", "glibc")])
def test_only_on_x86_64_glibc(machine: str, libc: str) -> None:
    assert choose({}, machine=machine, libc=libc) is None


LOADER = Path("/lib64/ld-linux-x86-64.so.2")


@pytest.mark.skipif(platform.machine() != "x86_64" or platform.libc_ver()[0] != "glibc" or not LOADER.exists(),
                    reason="x86-64 glibc")
def test_the_loader_takes_the_threshold() -> None:
    """The dynamic loader parses the value: ``ld.so --list-tunables`` reports the threshold a
    process started with it gets (other tunables keep theirs)."""
    value = memcopy.tunables({"GLIBC_TUNABLES": "glibc.malloc.check=1"})
    assert value is not None
    out = subprocess.run([str(LOADER), "--list-tunables"], env=dict(os.environ, GLIBC_TUNABLES=value),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert listed[memcopy.TUNABLE].split()[0] == "0x100000"
    assert listed["glibc.malloc.check"].split()[0] == "1"
