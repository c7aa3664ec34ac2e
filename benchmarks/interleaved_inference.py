"""Eval forward of a fused ResNet against eager and torch.compile, with ablations of its host
work, interleaved round by round.

Providers, each called once per round in an order rotated from round to round (channels_last;
``--dtype bfloat16`` runs them under CPU autocast):

- ``eager_cl``: eager PyTorch (torchvision's ResNet code).
- ``compile``: torch.compile of eager with inductor's ``freezing`` (BN folded, oneDNN's fused
  convolutions, the residual summed in place into a buffer it knows is dead).
- ``fused``: the ``cpu`` backend as a user runs it: the whole-model inference plan, each block
  writing its output into its input, checked by its state watch (fusedres.models.resnet.
  FusedResNet.forward).
- ``fused_out_of_place``: the same without the in-place writes (every block's output allocated).
- ``fused_unit_plans``: per-unit plans only (no block plans), out of place.
- ``fused_key_checked``: ``fused`` with the plan checked by its key on every call, as before
  the state watch (a copy of the model, its plan made without a watch).
- ``fused_no_winograd``: ``fused`` (a copy) with its float32 3x3s on oneDNN's convolution
  instead of Winograd's F(2x2, 3x3) (fusedres/backends/extension.py); bfloat16 is the same.
- ``fused_cached_plan``: ``fused``'s whole-model plan run directly, without any check that it
  still holds (its state watch, and the key every unit's module state and tensor versions make
  where the watch reports a change); fused minus this is what the check costs. Valid, like the
  replay below, only while neither model nor input changes.
- ``onednn_replay``: the floor for any Python composition of oneDNN's convolutions: inductor's
  call sequence replayed with no checks at all (BN folded, weights prepacked, the residual
  summed in place into the downsample's output or the block's input), built here for this one
  input and model, valid only as long as neither changes.

It prints each one's median, interquartile range, and the median over rounds of eager_cl's time
divided by its time in the same round (its speedup), with a 95% confidence interval; and, where
torch.compile ran, the same for fused against compile.

    python benchmarks/interleaved_inference.py --arch resnet50,resnet18 --batch 8 --size 112
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from unittest import mock

import torch

import fusedres
from fusedres import modules
from fusedres._ext import _C
from fusedres.models.resnet import _MODEL_PLANS, FusedResNet, _ModelPlan
from fusedres.ops.unit import input_signature
from fusedres.report import keep_freed_memory, machine_info
from _stats import median_interval


def _onednn_replay(eager: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """Inductor's freezing-path calls for ``eager`` (torchvision-style ResNet) on inputs shaped
    like x, in ``dtype``, without any host logic between them."""
    ops = torch.ops.mkldnn

    def fold(conv, bn, shape):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = (conv.weight * scale.view(-1, 1, 1, 1)).to(dtype)
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = ops._reorder_convolution_weight(weight, *geometry, list(shape))
        return (weight, (bn.bias - bn.running_mean * scale).to(dtype)) + geometry

    with torch.no_grad():
        h = x.to(dtype)
        stem = fold(eager.conv1, eager.bn1, h.shape)
        h = eager.maxpool(eager.relu(eager.bn1(eager.conv1(h.float()))))
        blocks = []
        for layer in (eager.layer1, eager.layer2, eager.layer3, eager.layer4):
            for block in layer:
                units, t = [], h
                for i in (1, 2, 3) if hasattr(block, "conv3") else (1, 2):
                    conv = getattr(block, f"conv{i}")
                    units.append(fold(conv, getattr(block, f"bn{i}"), t.shape))
                    t = conv(t)
                ds = block.downsample
                blocks.append((units, None if ds is None else fold(ds[0], ds[1], h.shape)))
                h = block(h)

    def run():
        h = ops._convolution_pointwise(x.to(dtype), *stem, "relu", [], "")
        h = eager.maxpool(h)
        for units, ds in blocks:
            t = h
            for unit in units[:-1]:
                t = ops._convolution_pointwise(t, *unit, "relu", [], "")
            if ds is None:
                ops._convolution_pointwise_.binary(h, t, *units[-1], "add", 1.0, "relu", [], "")
            else:
                t = ops._convolution_pointwise(t, *units[-1], "none", [], "")
                ops._convolution_pointwise_.binary(t, h, *ds, "add", 1.0, "relu", [], "")
                h = t
        return eager.fc(torch.flatten(eager.avgpool(h), 1))
    return run


def build_model(arch: str, dilated: bool) -> FusedResNet:
    """The fused ``arch`` on the cpu backend, with layer3 and layer4 dilated instead of strided
    (as segmentation backbones build it, ``replace_stride_with_dilation=[False, True, True]``)
    where ``dilated``."""
    return getattr(fusedres.models, arch)(
        backend="cpu", replace_stride_with_dilation=[False, True, True] if dilated else None)


def _providers(arch: str, batch: int, size: int, dtype: torch.dtype, with_compile: bool,
               dilated: bool):
    torch.manual_seed(0)
    fused = build_model(arch, dilated).eval()
    fused = fused.to(memory_format=torch.channels_last)
    eager = fusedres.to_eager(copy.deepcopy(fused)).eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    # The ablations below leave the model plan's state watch unread, as a call whose watch
    # reports a change (fusedres/models/resnet.py), so that they take the path they name.
    def out_of_place():
        with mock.patch.object(FusedResNet, "_activations_stay_inside", lambda self: False), \
                mock.patch.object(_ModelPlan, "unchanged_for", lambda *args: False):
            return fused(x)

    def unit_plans():
        with mock.patch.object(FusedResNet, "_activations_stay_inside", lambda self: False), \
                mock.patch.object(_ModelPlan, "unchanged_for", lambda *args: False), \
                mock.patch.object(modules, "block_state_key", lambda *args: None):
            return fused(x)

    providers = {"eager_cl": lambda: eager(x)}
    if with_compile:
        with torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(copy.deepcopy(eager), dynamic=False)
            with _autocast(dtype), torch.no_grad():
                compiled(x)  # compiles here, with freezing in force
        providers["compile"] = lambda: compiled(x)
    key_checked_model = copy.deepcopy(fused)

    def key_checked():
        with mock.patch.object(FusedResNet, "_state_watch", lambda self: None):
            return key_checked_model(x)

    no_winograd_model = copy.deepcopy(fused)

    def no_winograd():
        before = _C.cpu_winograd()
        _C.set_cpu_winograd(False)  # read when its plan is built
        try:
            return no_winograd_model(x)
        finally:
            _C.set_cpu_winograd(before)

    providers.update({"fused": lambda: fused(x), "fused_no_winograd": no_winograd,
                      "fused_key_checked": key_checked,
                      "fused_out_of_place": out_of_place, "fused_unit_plans": unit_plans,
                      "fused_cached_plan": _cached_plan(fused, x, dtype),
                      "onednn_replay": _onednn_replay(eager, x, dtype)})
    return providers


def _cached_plan(fused: FusedResNet, x: torch.Tensor, dtype: torch.dtype):
    """``fused``'s whole-model inference plan for x (made here by one call), run without any
    check, as FusedResNet.forward runs it once its state watch or its key says it holds."""
    with _autocast(dtype), torch.no_grad():
        fused(x)
    x_inside = FusedResNet._activation_layout(x)
    plan = _MODEL_PLANS.get(fused, input_signature(x_inside))
    return lambda: fused._head(plan.run(x_inside, fused.maxpool))


def _autocast(dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def time_rounds(providers: dict, rounds: int) -> dict:
    """Seconds per call of each provider: every round calls each once, in an order rotated from
    round to round, so a change in the machine's load hits all of them alike."""
    names = list(providers)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            providers[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarize(times: dict, bases: tuple = ("eager_cl", "compile")) -> dict:
    """Per provider: median and interquartile range of its times, and against each of ``bases``
    that was timed the median of the per-round ratios with its 95% interval."""
    result = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        result[name] = {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0]}
        for base in bases:
            if base in times:
                ratios = [b / t for b, t in zip(times[base], ts)]
                result[name][f"vs_{base}"] = (statistics.median(ratios), median_interval(ratios))
    return result


def print_table(result: dict) -> None:
    bases = [key[len("vs_"):] for key in next(iter(result.values())) if key.startswith("vs_")]
    print(f"{'provider':>19} {'median ms':>10} {'IQR':>6}"
          + "".join(f" {'vs ' + b:>24}" for b in bases))
    for name, r in result.items():
        cells = "".join(f" {r[f'vs_{b}'][0]:7.3f} [{r[f'vs_{b}'][1][0]:.3f}, "
                        f"{r[f'vs_{b}'][1][1]:.3f}]" for b in bases)
        print(f"{name:>19} {r['median_s'] * 1e3:10.1f} {r['iqr_s'] * 1e3:6.1f}{cells}")


def measure(arch: str, batch: int, size: int, dtype: torch.dtype, rounds: int, warmup: int,
            with_compile: bool, dilated: bool = False) -> dict:
    providers = _providers(arch, batch, size, dtype, with_compile, dilated)
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    with _autocast(dtype), torch.no_grad():
        expected = providers["eager_cl"]()
        for name, run in providers.items():
            for _ in range(warmup):
                out = run()
            scale = expected.abs().max().item()
            torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance,
                                       atol=tolerance * scale, msg=name)
        times = time_rounds(providers, rounds)
    return summarize(times)


def print_runs(names: list, measure_one, title, versions: str = "") -> None:
    """The report the interleaved benchmarks print: the machine and the load average, then for
    each of ``names`` the table of ``measure_one(name)`` (a :func:`summarize` result) under
    ``title(name)``, then the load average again. ``versions``: more after torch's version."""
    keep_freed_memory()  # as the main job: freed activations stay in the heap
    print(f"{machine_info(torch.device('cpu'))['cpu_model']}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}{versions}; load average before: {os.getloadavg()}")
    for name in names:
        result = measure_one(name)
        print(f"\n{title(name)}")
        print_table(result)
    print(f"\nload average after: {os.getloadavg()}")


def run_cli(measure, what: str, description: str, rounds: int, argv=None) -> int:
    """The command line shared with interleaved_training.py: parses the options, runs
    ``measure(arch, batch, size, dtype, rounds, warmup, with_compile, dilated)`` per ``--arch``
    and prints each table under a title naming ``what`` was timed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arch", default="resnet50,resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--dilated", action="store_true",
                   help="layer3 and layer4 dilated instead of strided, as in segmentation "
                        "backbones (replace_stride_with_dilation=[False, True, True])")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print_runs(args.arch.split(","),
               lambda arch: measure(arch, args.batch, args.size, dtype, args.rounds, args.warmup,
                                    not args.no_compile, args.dilated),
               lambda arch: (f"{arch}{' dilated (layer3-4)' if args.dilated else ''} batch "
                             f"{args.batch} {args.size}px {what}, {args.dtype} "
                             f"{'autocast ' if dtype != torch.float32 else ''}channels_last, "
                             f"{args.rounds} interleaved rounds; speedups: median of per-round "
                             "ratios [95% CI]"))
    return 0


def main(argv=None) -> int:
    return run_cli(measure, "eval forward", __doc__.split("\n\n")[0], rounds=40, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
