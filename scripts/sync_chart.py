#!/usr/bin/env python3
"""Keep the Helm chart's copies in step with their sources.

charts/salamander/files/ holds copies of what the repository generates: the CRD of crds/ (from
`salamander crd --write crds`) and the dashboards and alert rules of dashboards/ (from
scripts/gen_dashboards.py). The chart's appVersion is the project's version in pyproject.toml.

    python scripts/sync_chart.py           # copy what differs, remove stale copies
    python scripts/sync_chart.py --check   # exit 1, naming each file out of step; change nothing

Run it after regenerating the CRD or the dashboards; tests/chart/test_chart.py runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "salamander"
FILES = CHART / "files"


@dataclass(frozen=True)
class Copy:
    source: Path
    target: Path


def copies(repo: Path = REPO) -> list[Copy]:
    """Every file the chart carries a copy of: the CRD, each dashboard and the alert rules."""
    files = repo / "charts" / "salamander" / "files"
    sources = [repo / "crds" / "trainingjobs.salamander.dev.yaml"]
    sources += sorted((repo / "dashboards").glob("*.json")) + [repo / "dashboards" / "rules.yaml"]
    return [Copy(s, files / s.parent.name / s.name) for s in sources]


def stale_copies(repo: Path = REPO) -> list[Path]:
    """Files under the chart's files/crds and files/dashboards that copy nothing (any more)."""
    files = repo / "charts" / "salamander" / "files"
    wanted = {c.target for c in copies(repo)}
    present = [p for folder in ("crds", "dashboards") for p in sorted((files / folder).glob("*")) if p.is_file()]
    return [p for p in present if p not in wanted]


APP_VERSION = re.compile(r'^appVersion:\s*"?([^"\n]*)"?\s*$', re.MULTILINE)


def project_version(repo: Path = REPO) -> str:
    return tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]


def chart_app_version(repo: Path = REPO) -> str:
    match = APP_VERSION.search((repo / "charts" / "salamander" / "Chart.yaml").read_text())
    if match is None:
        raise SystemExit("sync_chart: charts/salamander/Chart.yaml has no appVersion")
    return match.group(1)


def differences(repo: Path = REPO) -> list[str]:
    """One line per thing out of step; empty when the chart is in step."""
    out = []
    for c in copies(repo):
        if not c.source.is_file():
            out.append(f"{c.source.relative_to(repo)} is missing")
        elif not c.target.is_file():
            out.append(f"{c.target.relative_to(repo)} is missing (a copy of {c.source.relative_to(repo)})")
        elif c.target.read_bytes() != c.source.read_bytes():
            out.append(f"{c.target.relative_to(repo)} differs from {c.source.relative_to(repo)}")
    out += [f"{p.relative_to(repo)} copies nothing in the repository" for p in stale_copies(repo)]
    version, app_version = project_version(repo), chart_app_version(repo)
    if version != app_version:
        out.append(f"charts/salamander/Chart.yaml: appVersion {app_version!r} is not the project's version {version!r}")
    return out


def sync(repo: Path = REPO) -> list[str]:
    """Bring the chart in step; returns what it changed."""
    changed = []
    for c in copies(repo):
        if not c.target.is_file() or c.target.read_bytes() != c.source.read_bytes():
            c.target.parent.mkdir(parents=True, exist_ok=True)
            c.target.write_bytes(c.source.read_bytes())
            changed.append(f"wrote {c.target.relative_to(repo)}")
    for p in stale_copies(repo):
        p.unlink()
        changed.append(f"removed {p.relative_to(repo)}")
    version = project_version(repo)
    if chart_app_version(repo) != version:
        chart = repo / "charts" / "salamander" / "Chart.yaml"
        chart.write_text(APP_VERSION.sub(f'appVersion: "{version}"', chart.read_text(), count=1))
        changed.append(f"set appVersion {version!r} in {chart.relative_to(repo)}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report what is out of step (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences()
        for line in problems:
            print(f"sync_chart: {line}", file=sys.stderr)
        if problems:
            print("sync_chart: run `python scripts/sync_chart.py` to bring the chart in step", file=sys.stderr)
        return 1 if problems else 0
    for line in sync():
        print(f"sync_chart: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
