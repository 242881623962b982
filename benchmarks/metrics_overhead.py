"""What the worker metrics cost per training step (issue 5: at most 0.5% of step time).

The workload is the example GPT (``examples/gpt``: 3 layers, d_model 96, batch 16 x 64, one
thread), trained in one process with the example's own sections and ``report`` call every
step: short CPU steps, where a fixed per-step cost weighs the most. Each round runs two fresh
processes side by side, metrics **off** (no ``PROMETHEUS_MULTIPROC_DIR``: every telemetry
call is a no-op) and **on** (prometheus-client's multiprocess files, as in a pod), alternating
which goes first; a process warms up, then times each step. Reported: median step time per
mode over all rounds, spread, and the ratio on/off.

Step-time differences of a fraction of a percent are below this machine's noise, so each "on"
process also times the instrumentation alone: the same five sections (with empty bodies) and
the ``report`` call, many times over, which is the metrics' exact per-step cost; that cost over
the median step time is the overhead figure that decides the goal.

    python benchmarks/metrics_overhead.py --rounds 6 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_stats import spread

ROOT = Path(__file__).resolve().parents[1]


def child(steps: int, warmup: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "examples" / "gpt"))
    import torch
    import train as gpt

    import salamander_worker as sw
    from salamander_worker import telemetry

    torch.set_num_threads(1)
    cfg = gpt.TrainConfig()
    text = gpt.make_corpus(gpt.CORPUS_CHARS, gpt.CORPUS_SEED)
    vocab = gpt.Vocab.of(text)
    data = vocab.encode(text)
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=vocab.size, block_size=cfg.seq_len, n_layer=cfg.n_layer,
                                  d_model=cfg.d_model, n_head=cfg.n_head))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = cfg.batch_size * cfg.seq_len
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        with sw.section("data"):
            x, y = gpt.sample_batch(data, cfg.batch_size, cfg.seq_len, 0, 0, step)
        with sw.section("forward"):
            loss = gpt.lm_loss(model(x), y)
        with sw.section("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with sw.section("optimizer"):
            optimizer.step()
        with sw.section("communication"):
            value = float(loss)
        sw.report(step + 1, loss=value, samples=(step + 1) * cfg.batch_size, tokens=(step + 1) * tokens,
                  flops_per_step=6.0 * n_params * tokens)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    # the instrumentation alone: five empty sections and a report, as a step makes them
    n = 5000
    started = time.perf_counter()
    for i in range(n):
        for name in ("data", "forward", "backward", "optimizer", "communication"):
            with sw.section(name):
                pass
        sw.report(warmup + steps + 1 + i, loss=1.0, samples=i, tokens=i * tokens, flops_per_step=1.0)
    per_step_s = (time.perf_counter() - started) / n
    return {"metrics": telemetry.enabled(), "step_s": times, "instrumentation_s": per_step_s}


def run_child(mode: str, steps: int, warmup: int) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(str(ROOT / p) for p in ("src", "worker/src", "operator/src"))
    with tempfile.TemporaryDirectory() as metrics_dir:
        if mode == "on":
            env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), "--warmup", str(warmup)],
                             env=env, check=True, capture_output=True, text=True, timeout=900)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["metrics"] == (mode == "on"), f"mode {mode}: telemetry enabled={result['metrics']}"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/metrics_overhead.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.warmup)))
        return 0
    steps: dict[str, list[float]] = {"off": [], "on": []}
    medians: dict[str, list[float]] = {"off": [], "on": []}
    instrumentation: list[float] = []
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        for mode in order:
            result = run_child(mode, args.steps, args.warmup)
            times = list(result["step_s"])  # type: ignore[arg-type]
            steps[mode] += times
            medians[mode].append(statistics.median(times))
            if mode == "on":
                instrumentation.append(float(result["instrumentation_s"]))  # type: ignore[arg-type]
        print(f"round {r + 1}/{args.rounds}: off {medians['off'][-1] * 1e3:.2f} ms, "
              f"on {medians['on'][-1] * 1e3:.2f} ms per step", file=sys.stderr, flush=True)
    off, on = statistics.median(steps["off"]), statistics.median(steps["on"])
    cost = statistics.median(instrumentation)
    report = {
        "command": f"python benchmarks/metrics_overhead.py --rounds {args.rounds} --steps {args.steps}",
        "workload": "examples/gpt defaults, 1 process, 1 thread",
        "step_s": {mode: spread(v) for mode, v in steps.items()},
        "round_medians_s": medians,
        "ratio_on_over_off": on / off,
        "instrumentation_per_step_s": spread(instrumentation),
        "instrumentation_over_step": cost / off,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"step: off {off * 1e3:.2f} ms, on {on * 1e3:.2f} ms (ratio {on / off:.4f}); "
          f"instrumentation {cost * 1e6:.1f} us per step = {cost / off:.3%} of a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
