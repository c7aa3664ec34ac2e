"""The triton backend's host time per unit and per Bottleneck, measured without a GPU.

On a GPU the triton backend's small and late-stage blocks are host-bound (the H200 run,
benchmarks/results/nvidia-h200/: 3-5 ms of host time per block training step where eager takes
1.5-2): what a call costs there is the Python around the launches plus the launches. This
script measures the first part on the CPU: the kernels run under Triton's interpreter with every
launch stubbed out (``InterpretedFunction.run`` does nothing), so a call costs fusedres's Python,
the dispatcher, autograd and the interpreter's launch wrapper, not the kernels. It is a proxy: a
real launch adds triton's own launch path (argument binding, the cache lookup, the driver call),
which only a GPU can time. Outputs are not checked (the kernels do not run); tests/kernels checks
them.

Providers, each called ``--calls`` times per round in rounds rotated as in
interleaved_inference.py: ``eager`` (nn.Conv2d + nn.BatchNorm2d + nn.ReLU, or torchvision's
Bottleneck code in fusedres.reference), ``cpu`` (the C++ backend: its convolutions really run,
on a 4x4 map) and ``triton`` (stubbed). Phases: ``eval`` (no_grad forward) and ``train`` (forward
with batch statistics and the backward of input and parameters). Prints each one's median
microseconds per call, interquartile range, and the median over rounds of eager's time over its
own with a 95% interval (> 1: less host time than eager).

    python benchmarks/triton_host_proxy.py --rounds 21
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by fusedres's triton backend)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from fusedres import FusedBottleneck, FusedConvBNReLU, reference  # noqa: E402
from fusedres.report import machine_info  # noqa: E402
from _stats import median_interval  # noqa: E402
from interleaved_inference import time_rounds  # noqa: E402

PROVIDERS = ("eager", "cpu", "triton")
LAUNCHES: collections.Counter = collections.Counter()


def _stub_launches() -> None:
    """Makes every interpreted launch count itself and return without running the kernel."""
    import triton.runtime.interpreter as interpreter
    if not hasattr(interpreter, "InterpretedFunction") or not hasattr(
            interpreter.InterpretedFunction, "run"):
        raise SystemExit(f"this triton ({interpreter.__file__}) has no "
                         "InterpretedFunction.run to stub")

    def run(self, *args, **kwargs):
        LAUNCHES[self.fn.__name__] += 1

    interpreter.InterpretedFunction.run = run


def _module(provider: str, kind: str) -> nn.Module:
    if kind == "bottleneck":  # an identity Bottleneck: 16 channels, planes 4
        if provider == "eager":
            return reference.Bottleneck(16, 4)
        return FusedBottleneck(16, 4, backend=provider)
    if provider == "eager":
        return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                             nn.ReLU())
    return FusedConvBNReLU(8, 8, 3, backend=provider)


def _call(provider: str, kind: str, phase: str, calls: int):
    """``calls`` calls of the module in ``phase``, as one function."""
    torch.manual_seed(0)
    module = _module(provider, kind).to(memory_format=torch.channels_last)
    module.train(phase == "train")
    x = torch.randn(1, 16 if kind == "bottleneck" else 8, 4, 4)
    x = x.contiguous(memory_format=torch.channels_last)
    if phase == "eval":
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    module(x)
        return run
    x.requires_grad_(True)
    inputs = [x, *module.parameters()]

    def run():
        for _ in range(calls):
            y = module(x)
            torch.autograd.grad(y, inputs, torch.ones_like(y))
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=100, help="calls per provider and round")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _stub_launches()
    import triton
    print(f"{machine_info(torch.device('cpu'))['cpu_model']}, 1 thread, torch {torch.__version__}, "
          f"triton {triton.__version__}; load average before: {os.getloadavg()}")
    print(f"host microseconds per call, triton's launches stubbed; {args.rounds} interleaved "
          f"rounds of {args.calls} calls; vs eager: median of per-round ratios [95% CI]")
    for kind in ("unit", "bottleneck"):
        for phase in ("eval", "train"):
            providers = {p: _call(p, kind, phase, args.calls) for p in PROVIDERS}
            for run in providers.values():
                run()  # warm up: plans, folds, the interpreter's caches
            LAUNCHES.clear()
            providers["triton"]()
            launches = sum(LAUNCHES.values()) // args.calls
            times = time_rounds(providers, args.rounds)
            print(f"\n{kind} {phase} (triton's launches per call: {launches})")
            print(f"{'provider':>9} {'median us':>10} {'IQR':>6} {'vs eager':>24}")
            for name, ts in times.items():
                us = [t / args.calls * 1e6 for t in ts]
                q = statistics.quantiles(us, n=4)
                ratios = [e / t for e, t in zip(times["eager"], ts)]
                low, high = median_interval(ratios)
                print(f"{name:>9} {statistics.median(us):10.0f} {q[2] - q[0]:6.0f} "
                      f"{statistics.median(ratios):8.3f} [{low:.3f}, {high:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
