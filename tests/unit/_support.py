"""Shared helpers of the unit tests: hypothesis settings and paths."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "gpt.yaml"
CRD_PATH = REPO / "crds" / "trainingjobs.salamander.dev.yaml"

#: Modest, reproducible property runs: no example database is written (nothing outside
#: tests/unit changes), examples are derandomized so a red run is reproducible, and no
#: deadline, since a slow shared CI machine must not turn into a flaky failure.
FAST = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: The same for properties whose examples are expensive (nested specs through pydantic and YAML).
QUICK = settings(FAST, max_examples=100)


def one_line(text: str) -> bool:
    """True when ``text`` is exactly one non-empty line (for every line break Python knows)."""
    return bool(text) and len(text.splitlines()) == 1 and text.splitlines()[0] == text


def timeless(status):  # (TrainingJobStatus) -> TrainingJobStatus
    """``status`` without its goodput ledger, which moves with the clock by design: what a
    level-based fixed point is judged on."""
    return status.model_copy(update={"goodput": None})
