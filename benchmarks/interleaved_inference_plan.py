"""Eval forward with and without the per-unit inference plans, interleaved round by round.

The plans (:mod:`fusedres.ops.unit`) let a repeated inference call skip the checks, the backend
choice and the module lookups. This times a fused model in channels_last on the ``cpu`` backend
with its plans and without them (every call through the checked path, as before plans
existed) beside eager PyTorch in channels_last, each once per round in an order rotated from
round to round, and prints each one's median, spread, and the median over rounds of eager's
time divided by its time in the same round (its speedup) with a 95% confidence interval.

    python benchmarks/interleaved_inference_plan.py --arch resnet50 --batch 8 --size 112
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from unittest import mock

import torch

import fusedres
from fusedres.ops import unit
from fusedres.report import machine_info
from interleaved_recompute import median_interval


def measure(arch: str, batch: int, size: int, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    fused = getattr(fusedres.models, arch)(backend="cpu").eval()
    fused = fused.to(memory_format=torch.channels_last)
    eager = fusedres.to_eager(copy.deepcopy(fused)).eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def without_plans():
        with mock.patch.object(unit, "_inference_plan_key", lambda *args: None):
            return fused(x)

    providers = {"eager_cl": lambda: eager(x), "fused_no_plans": without_plans,
                 "fused": lambda: fused(x)}
    names = list(providers)
    times = {name: [] for name in names}
    with torch.no_grad():
        expected = eager(x)
        for name, run in providers.items():
            for _ in range(warmup):
                out = run()
            torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3, msg=name)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                providers[name]()
                times[name].append(time.perf_counter() - start)
    result = {}
    for name, ts in times.items():
        speedups = [e / t for e, t in zip(times["eager_cl"], ts)]
        q = statistics.quantiles(ts, n=4)
        result[name] = {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0],
                        "speedup_vs_eager_cl": statistics.median(speedups),
                        "speedup_95ci": median_interval(speedups)}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50,resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{machine_info(torch.device('cpu'))['cpu_model']}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; load average before: {os.getloadavg()}")
    for arch in args.arch.split(","):
        result = measure(arch, args.batch, args.size, args.rounds, args.warmup)
        print(f"\n{arch} batch {args.batch} {args.size}px eval forward, float32 channels_last, "
              f"{args.rounds} interleaved rounds")
        print(f"{'provider':>15} {'median ms':>10} {'IQR':>7} {'speedup vs eager_cl':>20} "
              f"{'95% CI':>15}")
        for name, r in result.items():
            low, high = r["speedup_95ci"]
            print(f"{name:>15} {r['median_s'] * 1e3:10.1f} {r['iqr_s'] * 1e3:7.1f} "
                  f"{r['speedup_vs_eager_cl']:20.3f}   [{low:.3f}, {high:.3f}]")
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
