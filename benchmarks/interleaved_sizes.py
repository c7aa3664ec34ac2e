"""Eval forward on inputs whose size changes from call to call (multi-scale inference, a detection
backbone fed images of several sizes), fused against eager and torch.compile, interleaved round
by round.

Each provider's timed call runs the model once on each input size of ``--sizes`` in turn, so
every call meets a size other than its last one. A module keeps the inference plans of its
``fusedres.ops.fold.INPUT_SIZES_KEPT`` most recently used input sizes, and the folded weights
prepared for them; ``--sizes`` with more sizes than that makes every call build its plans and
prepare its weights again.

Providers (channels_last, float32):

- ``eager_cl``: eager PyTorch (torchvision's ResNet code).
- ``compile``: torch.compile of eager with inductor's ``freezing``; its default dynamic-shape
  handling (a graph with symbolic sizes once a second size has been seen), compiled in warm-up.
- ``fused``: the ``cpu`` backend as a user runs it.
- ``fused_one_size``: the same (a copy) keeping the plans and prepared weights of one input size
  per module (``INPUT_SIZES_KEPT`` = 1): every call of another size builds them again.

It prints each one's median, interquartile range (ms per pass over the sizes), and the median
over rounds of eager_cl's time divided by its time in the same round, with a 95% confidence
interval; and the same against torch.compile.

    python benchmarks/interleaved_sizes.py --arch resnet50 --batch 8 --sizes 112,128
"""

from __future__ import annotations

import argparse
import copy
from unittest import mock

import torch

import fusedres
from fusedres.ops import fold
from interleaved_inference import print_runs, summarize, time_rounds


def _providers(arch: str, batch: int, sizes: list, with_compile: bool) -> dict:
    torch.manual_seed(0)
    fused = getattr(fusedres.models, arch)(backend="cpu").eval()
    fused = fused.to(memory_format=torch.channels_last)
    eager = fusedres.to_eager(copy.deepcopy(fused)).eval()
    one_size_model = copy.deepcopy(fused)
    xs = [torch.randn(batch, 3, s, s).contiguous(memory_format=torch.channels_last)
          for s in sizes]

    def over_sizes(model):
        return lambda: [model(x) for x in xs]

    def one_size():
        with mock.patch.object(fold, "INPUT_SIZES_KEPT", 1):
            return [one_size_model(x) for x in xs]

    providers = {"eager_cl": over_sizes(eager)}
    if with_compile:
        with torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(copy.deepcopy(eager))
            with torch.no_grad():
                for x in xs:  # compiles here, with freezing in force
                    compiled(x)
        providers["compile"] = over_sizes(compiled)
    providers.update({"fused": over_sizes(fused), "fused_one_size": one_size})
    return providers


def measure(arch: str, batch: int, sizes: list, rounds: int, warmup: int,
            with_compile: bool) -> dict:
    providers = _providers(arch, batch, sizes, with_compile)
    with torch.no_grad():
        expected = providers["eager_cl"]()
        for name, run in providers.items():
            for _ in range(warmup):
                outs = run()
            for out, want in zip(outs, expected):
                torch.testing.assert_close(out, want, rtol=1e-3,
                                           atol=1e-3 * want.abs().max().item(), msg=name)
        times = time_rounds(providers, rounds)
    return summarize(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50,resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sizes", default="112,128",
                   help="input sizes (square), each run once per call in this order")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print_runs(args.arch.split(","),
               lambda arch: measure(arch, args.batch, sizes, args.rounds, args.warmup,
                                    not args.no_compile),
               lambda arch: (f"{arch} batch {args.batch}, sizes {args.sizes} in turn (ms per pass "
                             f"over them), eval forward, float32 channels_last, {args.rounds} "
                             "interleaved rounds; speedups: median of per-round ratios [95% CI]"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
