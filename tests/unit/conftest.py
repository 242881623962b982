"""Keep hypothesis's local caches (unicode tables, constants) out of the repository: the unit tests
write nothing outside their own temporary directories. The example database is off anyway
(see ``_support.FAST``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis.configuration import set_hypothesis_home_dir

if "HYPOTHESIS_STORAGE_DIRECTORY" not in os.environ:
    set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "salamander-unit-tests-hypothesis"))
