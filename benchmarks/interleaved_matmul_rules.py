"""Eval forward of a fused ResNet under each CPU's rule for which convolutions the cpu backend's
inference runs as a matrix product (oneDNN's prepacked linear over the im2col rows), against
eager and torch.compile, interleaved round by round.

The rule follows the CPU (fusedres/backends/extension.py, docs/design.md section 4): with AMX
every small output map takes the product; with AVX512 only those whose columns hold each input
pixel once; without AVX512 only one-pixel outputs of at least four images. Each rule's provider is
a copy of the model whose plan was built under that rule (the rule is read when a plan is built),
so all of them run here on this CPU, whichever it is.

Providers (float32, channels_last): ``eager_cl``, ``compile`` (inductor with ``freezing``),
``fused`` (this CPU's rule), ``fused_amx_rule``, ``fused_avx512_rule``, ``fused_avx2_rule``,
``fused_no_matmul`` (every convolution on oneDNN's convolution or Winograd's).

It prints each one's median, interquartile range, and the median over rounds of eager_cl's,
torch.compile's and fused's time divided by its time in the same round, with a 95% confidence
interval (> 1 against fused: that rule is faster here than this CPU's).

    python benchmarks/interleaved_matmul_rules.py --arch resnet50,resnet18 --batch 1 --size 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from unittest import mock

import torch

import fusedres
from fusedres.backends import extension
from interleaved_inference import print_runs, summarize, time_rounds

# rule -> (_MATMUL_REPEATING_COLUMNS, _MATMUL_MULTI_PIXEL_MAPS), or None: no matrix products.
RULES = {"amx": (True, True), "avx512": (False, True), "avx2": (False, False), "no_matmul": None}


def _built_under(rule, model: torch.nn.Module, x: torch.Tensor):
    """``model`` with its inference plan for x built under ``rule``: a call of it."""
    with contextlib.ExitStack() as patches, torch.no_grad():
        if rule is None:
            patches.enter_context(
                mock.patch.object(extension, "_convolves_as_matmul", lambda *args: False))
        else:
            patches.enter_context(
                mock.patch.object(extension, "_MATMUL_REPEATING_COLUMNS", rule[0]))
            patches.enter_context(
                mock.patch.object(extension, "_MATMUL_MULTI_PIXEL_MAPS", rule[1]))
        model(x)
        model(x)  # the second call puts the plan's state watch on: later calls only check it
    return lambda: model(x)


def measure(arch: str, batch: int, size: int, rounds: int, warmup: int, with_compile: bool):
    torch.manual_seed(0)
    fused = getattr(fusedres.models, arch)(backend="cpu").eval()
    fused = fused.to(memory_format=torch.channels_last)
    eager = fusedres.to_eager(copy.deepcopy(fused)).eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    providers = {"eager_cl": lambda: eager(x)}
    if with_compile:
        with torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(copy.deepcopy(eager), dynamic=False)
            with torch.no_grad():
                compiled(x)  # compiles here, with freezing in force
        providers["compile"] = lambda: compiled(x)
    providers["fused"] = lambda: fused(x)
    for name, rule in RULES.items():
        label = f"fused_{name}" if rule is None else f"fused_{name}_rule"
        providers[label] = _built_under(rule, copy.deepcopy(fused), x)
    with torch.no_grad():
        expected = providers["eager_cl"]()
        for name, run in providers.items():
            for _ in range(warmup):
                out = run()
            torch.testing.assert_close(out, expected, rtol=1e-3,
                                       atol=1e-3 * expected.abs().max().item(), msg=name)
        times = time_rounds(providers, rounds)
    return summarize(times, bases=("eager_cl", "compile", "fused"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50,resnet18")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    args = p.parse_args(argv)
    this_cpus_rule = next(name for name, rule in RULES.items()
                          if rule == (extension._MATMUL_REPEATING_COLUMNS,
                                      extension._MATMUL_MULTI_PIXEL_MAPS))
    print_runs(args.arch.split(","),
               lambda arch: measure(arch, args.batch, args.size, args.rounds, args.warmup,
                                    not args.no_compile),
               lambda arch: (f"{arch} batch {args.batch} {args.size}px eval forward, float32 "
                             f"channels_last, {args.rounds} interleaved rounds; speedups: median "
                             "of per-round ratios [95% CI]"),
               versions=f"; this CPU's rule: {this_cpus_rule}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
