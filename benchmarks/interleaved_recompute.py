"""Training step time of the block recomputation modes, interleaved round by round, on one model.

Each provider is a fused model on the ``cpu`` backend (or the one given) whose blocks run in one
recomputation mode (:mod:`fusedres.ops.block`): ``off`` (the per-unit path), ``bn_act`` (the
default) and ``conv1``, plus eager PyTorch for reference. Every round runs one training step of
each provider, in an order rotated from round to round, so that a change in the machine's load
hits all of them alike; the table gives each provider's median step, its spread, the median
over rounds of its step time divided by the per-unit path's in the same round, and a 95%
confidence interval of that median ratio (distribution-free, from the order statistics of the
per-round ratios): a difference is a result only where the interval says so.

    python benchmarks/interleaved_recompute.py --arch resnet50 --batch 8 --size 112

A shared machine's timings mean little: the script prints the load average before and after
(run it when the 1-minute load is well below the core count) and the CPU model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fusedres
from fusedres import FusedBasicBlock, FusedBottleneck
from fusedres.report import machine_info

from _stats import median_interval

CONFIGS = {
    "fp32-nchw": (torch.float32, torch.contiguous_format),
    "bf16-cl": (torch.bfloat16, torch.channels_last),
}


def set_recompute(model: torch.nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, (FusedBasicBlock, FusedBottleneck)):
            m.recompute = mode


def make_step(model, x, target, dtype):
    """Forward (under CPU autocast for bf16), cross-entropy, backward, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = dtype != torch.float32

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(x)
        F.cross_entropy(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(args, config: str) -> dict:
    dtype, fmt = CONFIGS[config]
    torch.manual_seed(0)
    base = getattr(fusedres.models, args.arch)(backend=args.backend).train()
    providers = {}
    for mode in args.modes:
        model = copy.deepcopy(base).to(memory_format=fmt)
        set_recompute(model, mode)
        providers[mode] = model
    if args.eager:
        providers["eager"] = fusedres.to_eager(copy.deepcopy(base)).to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (args.batch,))
    steps = {name: make_step(m, x, target, dtype) for name, m in providers.items()}
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    base_name = "off" if "off" in times else names[0]
    result = {}
    for name, ts in times.items():
        paired = [t / b for t, b in zip(ts, times[base_name])]
        q = statistics.quantiles(ts, n=4)
        result[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                        "iqr_s": q[2] - q[0],
                        f"median_ratio_vs_{base_name}": statistics.median(paired),
                        "ratio_95ci": median_interval(paired),
                        "images_per_s": args.batch / statistics.median(ts), "times_s": ts}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", default="fp32-nchw,bf16-cl",
                   help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--modes", default="off,bn_act,conv1")
    p.add_argument("--no-eager", dest="eager", action="store_false")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    report = {"cpu": machine_info(torch.device("cpu"))["cpu_model"],
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "arch": args.arch, "batch": args.batch, "size": args.size, "rounds": args.rounds,
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
              "load_before": os.getloadavg(), "configs": {}}
    print(f"{report['cpu']}, {report['threads']} threads, torch {torch.__version__}; "
          f"load average before: {report['load_before']}")
    for config in args.configs.split(","):
        result = measure(args, config)
        report["configs"][config] = result
        print(f"\n{args.arch} batch {args.batch} {args.size}px train step, {config}, "
              f"{args.rounds} interleaved rounds")
        print(f"{'provider':>8} {'median ms':>10} {'min':>8} {'max':>8} {'IQR':>7} "
              f"{'img/s':>7} {'paired ratio':>13} {'95% CI':>15}")
        for name, r in result.items():
            ratio = next(v for k, v in r.items() if k.startswith("median_ratio"))
            print(f"{name:>8} {r['median_s'] * 1e3:10.1f} {r['min_s'] * 1e3:8.1f} "
                  f"{r['max_s'] * 1e3:8.1f} {r['iqr_s'] * 1e3:7.1f} {r['images_per_s']:7.2f} "
                  f"{ratio:13.4f}   [{r['ratio_95ci'][0]:.3f}, {r['ratio_95ci'][1]:.3f}]")
    report["load_after"] = os.getloadavg()
    print(f"\nload average after: {report['load_after']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
