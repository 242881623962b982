"""Keep hypothesis's local caches (unicode tables, constants) out of the repository: the unit tests
write nothing outside their own temporary directories. The example database is off anyway
(see ``_support.FAST``). ``one_process_group``: a gloo world of one, for code that needs one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "salamander-unit-tests-hypothesis"))


@pytest.fixture
def one_process_group(tmp_path):  # type: ignore[no-untyped-def]
    import torch.distributed as dist   # here, so tests that need no torch do not import it
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
