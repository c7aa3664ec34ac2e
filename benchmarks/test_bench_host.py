"""Host cost of one unit (3x3 conv -> BN -> ReLU) and of one Bottleneck block per backend, beside
eager PyTorch's modules.

At N=1, C=8, 4x4 (the block: C=16, 4x4) the kernels cost next to nothing, so on the CPU the time
per call is what surrounds them: Python, the dispatcher, autograd's bookkeeping, the
running-statistics update and any small tensor ops between kernels. On CUDA it is the host's time to enqueue a unit: the
timed stretch does not synchronise (fusedres.report.time_interleaved with ``host=True``), so a
kernel's device time is not in it. Issue 13 wants a unit to cost one dispatcher call forward and
one backward; this group shows how far each backend is from eager PyTorch's modules. The block
group shows the same for the block-level op (fusedres/ops/block.py), whose training step is
what a FusedResNet runs.

Providers, timed in the same rounds (conftest.Interleaved): ``eager`` (``nn.Conv2d`` +
``nn.BatchNorm2d`` + ``nn.ReLU``, or torchvision's Bottleneck code in
``fusedres.reference.Bottleneck``: what eager PyTorch users run), ``eager_backend``
(``FusedConvBNReLU`` or ``FusedBottleneck`` on fusedres's eager backend: the reference
composition behind fusedres's op machinery) and the fused module on every fused backend usable
here (``cpu``; ``triton`` and ``cuda`` on a GPU).

Phases (one group each): ``train_fwd`` (training forward, batch statistics, autograd
recording), ``eval_fwd`` (eval forward under no_grad) and ``bwd`` (backward of a kept graph,
gradients of the input and every parameter, ``torch.autograd.grad`` with ``retain_graph``).
extra_info ``host_us_per_call``: the median in microseconds per call of the unit or block.

    pytest benchmarks/test_bench_host.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fusedres import FusedBottleneck, FusedConvBNReLU, reference
from fusedres.report import make_provider, provider_status

from _providers import DEVICE, GPU, interleave_functions, rounds, warmup
from conftest import publish

# N, C, H, W of each module's input: kernels of a few nanoseconds of work.
SHAPES = {"unit": (1, 8, 4, 4), "bottleneck": (1, 16, 4, 4)}
CALLS = 50  # calls per timed stretch: the timer's resolution and overhead vanish in it
PHASES = ("train_fwd", "eval_fwd", "bwd")


def _params() -> list:
    params = [pytest.param("eager", id="eager"), pytest.param("eager_backend", id="eager_backend")]
    for name in ("cpu", "triton", "cuda"):
        ok, why = provider_status(make_provider(name), DEVICE)
        params.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(
            reason=f"{name} unusable on {DEVICE}: {why}")))
    return params


def _module(provider: str, kind: str) -> nn.Module:
    c = SHAPES[kind][1]
    backend = "eager" if provider == "eager_backend" else provider
    if kind == "bottleneck":  # an identity Bottleneck: planes c/4, expanded back to c
        if provider == "eager":
            return reference.Bottleneck(c, c // 4)
        return FusedBottleneck(c, c // 4, backend=backend)
    if provider == "eager":
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                             nn.ReLU())
    return FusedConvBNReLU(c, c, 3, backend=backend)


def _phase_fn(provider: str, phase: str, kind: str):
    """One call of the unit or block in ``phase``, not synchronised."""
    torch.manual_seed(0)
    # channels_last where the backend's kernels want it (triton, cuda), as inside a network.
    fmt = torch.channels_last if provider in ("triton", "cuda") else torch.contiguous_format
    unit = _module(provider, kind).to(DEVICE).to(memory_format=fmt).train(phase != "eval_fwd")
    x = torch.randn(SHAPES[kind], device=DEVICE).contiguous(memory_format=fmt)
    if phase == "eval_fwd":
        def eval_fwd():
            with torch.no_grad():
                unit(x)
        return eval_fwd
    x.requires_grad_(True)  # inside a network the input carries a gradient
    if phase == "train_fwd":
        return lambda: unit(x)
    y = unit(x)
    inputs = [x, *unit.parameters()]
    gy = torch.randn_like(y)
    return lambda: torch.autograd.grad(y, inputs, gy, retain_graph=True)


@pytest.mark.parametrize("provider", _params())
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("kind", list(SHAPES))
def test_host_cost(benchmark, request, interleaved, kind, phase, provider):
    what = "unit" if kind == "unit" else "Bottleneck"
    benchmark.group = f"host {phase} {what} {'x'.join(map(str, SHAPES[kind]))}" + (
        " 3x3" if kind == "unit" else "")
    first_call_s = interleave_functions(
        request, benchmark, interleaved, lambda name: _phase_fn(name, phase, kind),
        n_rounds=rounds(20), n_warmup=warmup(2), calls=CALLS, host=True)
    info = {"provider": provider, "backend": "eager" if provider.startswith("eager") else provider,
            "module": kind, "phase": phase, "device": torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
            "calls_per_round": CALLS, "first_call_s": first_call_s}
    if benchmark.stats is not None:  # None under --benchmark-disable
        info["host_us_per_call"] = benchmark.stats.stats.median * 1e6
    publish(benchmark, info)
