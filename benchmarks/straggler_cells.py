"""Selected cells of the straggler replay (``straggler_detection.py``, part (b)), with the same
cases and seeds as the full benchmark, and the detector's median rules switchable for a
before/after comparison on the same runs.

    python benchmarks/straggler_cells.py --recordings REC.json --cells h64:0.5 --runs 80
    python benchmarks/straggler_cells.py --recordings REC.json --cells s8:0.5 --runs 30 \\
        --median-evidence-fraction 0.5 --median-family-z 0 --median-needs-means 0   # the earlier rules

``--cells``: comma-separated ``KINDn:noise``: KIND ``h`` (healthy runs, seeds ``10000 n + s``)
or ``s`` (slowed runs of ``--methods`` and ``--levels``, seeds as the benchmark's), ``n`` the
ranks (8: one per node; 64: 8 nodes of 8, and the ``node`` method), ``noise`` the scale of each
rank's own deviations (1: as recorded). ``--medians 0`` replays ranks of older workers (means
only). ``--per-step 0,1`` replays every run twice in the same process: as ranks that send no
per-step busy times (main's detector: means and medians) and as ranks that do (the sequential
test beside them); the config column says which. ``--seq-var-suspect off@1e6,0.5@3e6`` does
the same for the sequential test's variance estimate, replaying the per-step runs once per
setting: every rank counts (``off``, as before) or ranks whose statistic is above that fraction
of ``h`` are left out (``SEQ_VAR_SUSPECT_FRACTION``), each with ``SEQ_ARL_STEPS`` after ``@``
(without it, ``--seq-arl`` or the module's) and optionally ``SEQ_VAR_SUSPECT_MIN_STEPS``
after a second ``@`` (``0.5@3e6@200``: suspects left out only once the estimate spans 200
steps; without it, the module's); without the option, the module's settings. Prints
the benchmark's table, and the per-flag detail with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import straggler_detection as bd  # noqa: E402
from salamander_operator import stragglers as sg  # noqa: E402


# (SEQ_VAR_SUSPECT_FRACTION, SEQ_ARL_STEPS, SEQ_VAR_SUSPECT_MIN_STEPS); None: the module's
Setting = tuple[float | None, float, int] | None


def setting_of(text: str) -> tuple[float | None, float, int]:
    """``off`` or a fraction, optionally ``@ARL`` and then ``@MIN_STEPS``: (the fraction or None,
    the ARL, the steps the variance estimate must span before suspects are left out)."""
    fraction, _, rest = text.partition("@")
    arl, _, min_steps = rest.partition("@")
    return ((None if fraction == "off" else float(fraction)), (float(arl) if arl else sg.SEQ_ARL_STEPS),
            (int(float(min_steps)) if min_steps else sg.SEQ_VAR_SUSPECT_MIN_STEPS))


def label_of(setting: tuple[float | None, float, int]) -> str:
    fraction, arl, min_steps = setting
    after = f" from {min_steps}" if fraction is not None and min_steps else ""
    return f", var {'all' if fraction is None else f'-{fraction:g}h'}{after} arl {arl:.0e}"


def _replay_with(job: tuple[bd.Noise, bd.Case, Setting]) -> dict:
    """One replay with the variance estimate's suspects and the ARL as ``setting`` says (set in
    this process: they are module globals, and the pool's processes replay cases of every
    setting)."""
    noise, case, setting = job
    if setting is not None:
        sg.SEQ_VAR_SUSPECT_FRACTION, sg.SEQ_ARL_STEPS, sg.SEQ_VAR_SUSPECT_MIN_STEPS = setting
    return bd.replay(noise, case)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recordings", required=True, help="part (a)'s recordings (--save-recordings)")
    p.add_argument("--cells", default="h64:0.5")
    p.add_argument("--runs", type=int, default=20, help="runs per cell (per method and level when slowed)")
    p.add_argument("--levels", default="0.1,0.25,0.5")
    p.add_argument("--methods", default="sleep,cpu,data,node")
    p.add_argument("--medians", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="processes (results do not depend on it)")
    p.add_argument("--median-evidence-fraction", type=float, default=None)
    p.add_argument("--median-family-z", type=int, default=None)
    p.add_argument("--median-needs-means", type=int, default=None)
    p.add_argument("--means-family-z", type=int, default=None)
    p.add_argument("--seq-arl", type=float, default=None, help="the sequential test's SEQ_ARL_STEPS")
    p.add_argument("--per-step", default="0", help="comma-separated 0/1: replay without / with per-step busy times")
    p.add_argument("--seq-var-suspect", default=None,
                   help="comma-separated: off, or a fraction of h above which a rank is left out of the variance, "
                        "each optionally @SEQ_ARL_STEPS, then @SEQ_VAR_SUSPECT_MIN_STEPS (0.5@3e6@200)")
    p.add_argument("--seed-offset", type=int, default=0, help="added to every seed (tuning runs apart from reported)")
    p.add_argument("--json", help="write every run's result here")
    a = p.parse_args()
    if a.median_evidence_fraction is not None:
        sg.MEDIAN_EVIDENCE_FRACTION = a.median_evidence_fraction
    if a.median_family_z is not None:
        sg.MEDIAN_FAMILY_Z = bool(a.median_family_z)
    if a.median_needs_means is not None:
        sg.MEDIAN_NEEDS_MEANS = bool(a.median_needs_means)
    if a.means_family_z is not None:
        sg.MEANS_FAMILY_Z = bool(a.means_family_z)
    if a.seq_arl is not None:
        sg.SEQ_ARL_STEPS = a.seq_arl
    print(f"median evidence fraction {sg.MEDIAN_EVIDENCE_FRACTION}, median family z {sg.MEDIAN_FAMILY_Z}, "
          f"median needs means {sg.MEDIAN_NEEDS_MEANS}, means family z {sg.MEANS_FAMILY_Z}, "
          f"sequential ARL {sg.SEQ_ARL_STEPS:g} steps", file=sys.stderr)
    noise, _ = bd.noise_from(json.loads(Path(a.recordings).read_text()))
    methods, levels = a.methods.split(","), [float(x) for x in a.levels.split(",")]
    settings: list[Setting] = ([None] if a.seq_var_suspect is None else
                               [setting_of(x) for x in a.seq_var_suspect.split(",")])
    cases: list[tuple[bd.Case, Setting]] = []
    for cell, setting in ((c, x) for c in a.cells.split(",") for x in settings):
        kind, rest = cell[0], cell[1:]
        n_s, scale_s = rest.split(":")
        n, scale = int(n_s), float(scale_s)
        per_node = 1 if n <= 8 else 8
        off = a.seed_offset
        for ps in (bool(int(x)) for x in a.per_step.split(",")):
            var = label_of(setting) if setting is not None and ps else ""
            common = dict(noise_scale=scale, medians=bool(a.medians), per_step=ps,
                          config=f"noise x{scale}{'' if a.medians else ', means only'}{', per-step' if ps else ''}"
                                 f"{var}")
            if not ps and setting != settings[0]:
                continue  # without per-step times neither setting is used: replayed once
            run_setting = setting if ps else None
            if kind == "h":
                cases += [(bd.Case(n, per_node, "none", 0.0, 10_000 * n + s + off, **common), run_setting)
                          for s in range(a.runs)]
                continue
            for i, m in enumerate(bd.METHODS + (("node",) if per_node > 1 else ())):
                for j, lvl in enumerate(bd.LEVELS):
                    if m in methods and lvl in levels:
                        cases += [(bd.Case(n, per_node, m, lvl, 1_000_000 * n + 100_000 * i + 1000 * j + s + off,
                                           **common), run_setting) for s in range(a.runs)]
    jobs = [(noise, c, setting) for c, setting in cases]
    started = time.monotonic()
    if a.workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=a.workers) as pool:
            results = list(pool.map(_replay_with, jobs, chunksize=2))
    else:
        results = [_replay_with(j) for j in jobs]
    bd.print_table(bd.summarize(results))
    print(f"{len(cases)} runs in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
