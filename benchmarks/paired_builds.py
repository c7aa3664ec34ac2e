"""The same fused model's step under two builds of fusedres, interleaved round by round.

A change inside the extension (csrc/) cannot be switched on and off in one process, so each
build runs in its own worker process (``PYTHONPATH`` set to its checkout, built in place) and the
driver asks them for one step each in turn, alternating who goes first; only one runs at a
time. Both start from the same weights and batch (seed 0); their first losses must agree.
Prints each build's median and interquartile range and the median over rounds of the base
build's time divided by the other's, with its 95% interval (> 1: the other is faster).

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/paired_builds.py --base /tmp/base --other . --arch resnet18 --dtype float32
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

from _stats import median_interval


def _worker(arch: str, dtype_name: str, mode: str, batch: int, size: int) -> None:
    """Builds the model, then runs one timed step per line read from stdin and prints
    "<ms> <loss>" (the loss is the first logit's sum in eval)."""
    import torch
    import torch.nn.functional as F

    import fusedres

    torch.set_num_threads(int(os.environ.get("PAIRED_THREADS", torch.get_num_threads())))
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = getattr(fusedres.models, arch)(backend="cpu").to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    model.train(mode == "train")

    def step() -> float:
        if mode == "eval":
            with autocast, torch.no_grad():
                return model(x).float().sum().item()
        with autocast:
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    print("ready", fusedres.__file__, flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        loss = step()
        print(f"{(time.perf_counter() - start) * 1e3:.4f} {loss!r}", flush=True)


class _Build:
    def __init__(self, name: str, checkout: str, args):
        self.name = name
        env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout) + os.pathsep
                   + os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", args.arch, args.dtype,
             args.mode, str(args.batch), str(args.size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/")
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"{name} ({checkout}): the worker did not start")
        print(f"{name}: {ready[1]}")

    def step(self) -> tuple[float, float]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        ms, loss = self.proc.stdout.readline().split()
        return float(ms), float(loss)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="checkout of the base build (built in place)")
    p.add_argument("--other", required=True, help="checkout of the build compared with it")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mode", default="train", choices=["train", "eval"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    builds = [_Build("base", args.base, args), _Build("other", args.other, args)]
    try:
        first = [b.step()[1] for b in builds]
        tolerance = 1e-3 if args.dtype == "float32" else 3e-2
        if not math.isclose(first[0], first[1], rel_tol=tolerance):
            raise AssertionError(f"first losses differ: base {first[0]}, other {first[1]}")
        for b in builds:
            for _ in range(args.warmup):
                b.step()
        times: dict = {b.name: [] for b in builds}
        for r in range(args.rounds):
            for b in builds if r % 2 == 0 else builds[::-1]:
                times[b.name].append(b.step()[0])
    finally:
        for b in builds:
            b.close()
    print(f"{args.arch} batch {args.batch} {args.size}px {args.mode} step, {args.dtype}, "
          f"{args.rounds} rounds, builds alternating")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        print(f"{name:>6}: median {statistics.median(ts):.1f} ms, IQR {q[2] - q[0]:.1f}")
    ratios = [a / b for a, b in zip(times["base"], times["other"])]
    low, high = median_interval(ratios)
    print(f"base / other per round: {statistics.median(ratios):.3f} [{low:.3f}, {high:.3f}]")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(main())
