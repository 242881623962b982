"""The training thread's cost of capturing a snapshot's state: torch's ``get_state_dict`` beside
the cached one (:mod:`salamander_worker.snapshot.state_dicts`) on the same model (issue 4).

The model has GPT-2 small's tensors on the CPU: 12 blocks of attention and MLP weights and
layer norms plus the embedding, 145 parameters with AdamW state (the values do not matter,
only the number of tensors). The two are measured alternately, ``--repeats`` times each.

    python benchmarks/snapshot_capture.py --repeats 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "worker/src"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_stats import machine, spread  # noqa: E402
from salamander_worker.snapshot.capture import Trainee, capture  # noqa: E402
from salamander_worker.snapshot.state_dicts import StateDicts  # noqa: E402


def gpt2_shaped(width: int = 768, blocks: int = 12, vocab: int = 50257) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Embedding(vocab, width)]
    for _ in range(blocks):
        layers += [torch.nn.LayerNorm(width), torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width),
                   torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)]
    return torch.nn.Sequential(*layers, torch.nn.LayerNorm(width))


class Uncached(StateDicts):
    """torch's ``get_state_dict`` on every call, as before the cache."""

    def __call__(self, model, optimizer):  # type: ignore[no-untyped-def, override]
        return self._torch(model, optimizer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/snapshot_capture.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    model = gpt2_shaped()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    tensors = sum(1 for _ in model.parameters())
    trainees = {"get_state_dict": Trainee(model, optimizer, state_dicts=Uncached()),
                "cached": Trainee(model, optimizer)}
    times: dict[str, list[float]] = {name: [] for name in trainees}
    for n in range(a.repeats + 1):
        for name, trainee in trainees.items():
            started = time.perf_counter()
            capture(trainee, n)
            if n:   # the first call of each is a warm-up (and the cache's one torch call)
                times[name].append(time.perf_counter() - started)
        if n % 50 == 0:
            print(f"{n}/{a.repeats}", file=sys.stderr, flush=True)
    summary = {name: spread([t * 1e3 for t in values]) for name, values in times.items()}
    ratio = statistics.median(times["get_state_dict"]) / statistics.median(times["cached"])
    result = {"machine": machine(), "command": " ".join(sys.argv), "tensors": tensors,
              "capture_ms": summary, "speedup": ratio,
              "torch_calls_by_cache": trainees["cached"].state_dicts.torch_calls}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    for name, s in summary.items():
        print(f"{name:>15}: capture {s['median']:.2f} ms (p10 {s['p10']:.2f}, p90 {s['p90']:.2f}, n {s['n']})")
    print(f"speedup {ratio:.1f}x; the cache called torch {result['torch_calls_by_cache']} time(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
