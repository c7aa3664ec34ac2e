"""BatchNorm (training) + residual add + ReLU on CPU: eager PyTorch vs torch.compile vs the fused
C++ ops.

Run with ``pytest benchmarks/test_bench_bn_act.py --benchmark-only``. One pytest-benchmark group
per (shape, mode); the providers, named as in _providers, each in its memory format:

- ``eager`` (NCHW) and ``eager_cl`` (channels_last): ``relu(F.batch_norm(z, training=True) +
  residual)``, backward by autograd;
- ``compile``: torch.compile (inductor) of that eager function, channels_last; extra_info's
  ``first_call_s`` holds the compile. FUSEDRES_BENCH_COMPILE=0 skips it;
- ``cpu`` (NCHW) and ``cpu_cl`` (channels_last): ``bn_stats -> rsqrt -> scale/shift ->
  bn_act_fwd`` and ``bn_act_bwd`` (torch.ops.fusedres, csrc/cpu).

Modes: ``fwd``, ``bwd`` (gradients of z, gamma, beta and the residual for a fixed dy) and
``full`` (both). ``extra_info["GB/s"]`` counts the bytes the op must move at least, the same for
every provider (an effective rate), in tensor passes of the [N, C, H, W] activation
(:data:`MIN_PASSES`); ``traffic_ratio_vs_eager`` is the passes eager makes over the passes the
provider makes, by fusedres.traffic's counting rules (:data:`EAGER_PASSES`; the fused ops make
the minimum; None for torch.compile, whose kernels the model does not describe).

On a GPU this file is skipped: benchmarks/test_bench_triton.py times the same ops there (cuda,
triton and eager in the same groups).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _providers import (DEVICE, interleave_functions, make_provider, provider_params, rounds,
                        warmup)
from conftest import record
from fusedres import traffic

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cpu", reason="CPU benchmark of the C++ ops; on CUDA "
    "benchmarks/test_bench_triton.py times them (cuda, triton, eager)")

EPS = 1e-5
SHAPES = [(8, 512, 28, 28), (8, 256, 56, 56), (8, 1024, 14, 14)]
#: Passes the op must make at least. Forward: read z for the statistics; read z and the residual,
#: write y. Backward: the batch-statistics gradient needs sums over the whole batch before dz, so
#: two passes: read dy, y and z, write dresidual; read dresidual and z, write dz.
MIN_PASSES = {"fwd": 4, "bwd": 7, "full": 11}
#: Passes eager PyTorch makes (fusedres.traffic, rule 4). Forward: statistics (read z), normalise
#: (read z, write t), add (read t and the residual, write s), ReLU (read s, write y). Backward:
#: ReLU backward (read dy and y, write g), BatchNorm backward (read g and z twice, write dz).
EAGER_PASSES = {"fwd": 8, "bwd": 8, "full": 16}
PROVIDERS = ["eager", "eager_cl", "compile", "cpu", "cpu_cl"]
# Each case takes milliseconds; many rounds make the median robust to a noisy shared machine.
ROUNDS = 30


class Case:
    """Inputs of one unit: z, residual, dy [N, C, H, W]; gamma, beta, running stats [C]."""

    def __init__(self, shape, fmt):
        c = shape[1]
        self.z = torch.randn(shape).contiguous(memory_format=fmt)
        self.res = torch.randn(shape).contiguous(memory_format=fmt)
        self.dy = torch.randn(shape).contiguous(memory_format=fmt)
        self.gamma = torch.rand(c) + 0.5
        self.beta = torch.randn(c)
        self.running_mean, self.running_var = torch.zeros(c), torch.ones(c)


def eager_fns(case, compile_it: bool):
    z = case.z.clone().requires_grad_()
    res = case.res.clone().requires_grad_()
    gamma = case.gamma.clone().requires_grad_()
    beta = case.beta.clone().requires_grad_()
    leaves = (z, gamma, beta, res)

    def unit():
        out = F.batch_norm(z, case.running_mean, case.running_var, gamma, beta, True, 0.1, EPS)
        return torch.relu(out + res)

    if compile_it:
        # A fresh dynamo cache per case: the same code compiled for 9 cases would pass dynamo's
        # recompile limit (8) and run the last ones eagerly.
        torch._dynamo.reset()
    fwd = torch.compile(unit, dynamic=False) if compile_it else unit
    y = fwd()

    def bwd():
        return torch.autograd.grad(y, leaves, case.dy, retain_graph=True)

    def full():
        return torch.autograd.grad(fwd(), leaves, case.dy)

    return {"fwd": fwd, "bwd": bwd, "full": full}


def fused_fns(case, compile_it: bool):
    ops = torch.ops.fusedres

    def fwd():
        mean, var = ops.bn_stats(case.z)
        invstd = torch.rsqrt(var + EPS)
        scale = case.gamma * invstd
        y = ops.bn_act_fwd(case.z, scale, case.beta - mean * scale, case.res, True)
        return y, mean, invstd

    y, mean, invstd = fwd()

    def bwd():
        return ops.bn_act_bwd(case.dy, y, case.z, mean, invstd, case.gamma, True, True, True)

    def full():
        y, mean, invstd = fwd()
        return ops.bn_act_bwd(case.dy, y, case.z, mean, invstd, case.gamma, True, True, True)

    return {"fwd": fwd, "bwd": bwd, "full": full}


@pytest.mark.parametrize("provider", provider_params("kernels", PROVIDERS))
@pytest.mark.parametrize("mode", list(MIN_PASSES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_act(benchmark, request, interleaved, shape, mode, provider):
    benchmark.group = f"bn_act {'x'.join(map(str, shape))} {mode}"

    def make_fn(name):
        p = make_provider(name)
        torch.manual_seed(0)
        case = Case(shape, torch.channels_last if p.channels_last else torch.contiguous_format)
        return (fused_fns if p.backend == "cpu" else eager_fns)(case, p.compiled)[mode]

    first_call_s = interleave_functions(request, benchmark, interleaved, make_fn,
                                        n_rounds=rounds(ROUNDS), n_warmup=warmup(2))
    p = make_provider(provider)
    passes = None if p.compiled else (EAGER_PASSES if p.backend == "eager" else MIN_PASSES)[mode]
    n, c, h, w = shape
    record(benchmark, provider, MIN_PASSES[mode] * n * c * h * w * 4,  # float32 passes
           backend=p.backend, channels_last=p.channels_last, compiled=p.compiled, mode=mode,
           first_call_s=first_call_s,
           traffic_ratio_vs_eager=EAGER_PASSES[mode] / passes if passes else None)


def test_pass_counts_follow_the_traffic_model():
    """The pass tables above against fusedres.traffic: for a unit whose convolution is the same
    for every backend, eager minus fused bytes must be the passes eager makes beyond the fused
    ops, in training (forward + backward) and in eval (the forward without the statistics)."""
    n, c, h, w = SHAPES[0]
    unit = traffic.Unit("u", n, c, h, w, c, kernel=1, residual=True, needs_dx=False)
    pass_bytes = n * c * h * w * 4

    def eager_minus_fused(training):
        return (traffic.unit_traffic(unit, "eager", training).total
                - traffic.unit_traffic(unit, "cpu", training).total)

    assert eager_minus_fused(True) == (EAGER_PASSES["full"] - MIN_PASSES["full"]) * pass_bytes
    assert EAGER_PASSES["full"] == EAGER_PASSES["fwd"] + EAGER_PASSES["bwd"]
    assert MIN_PASSES["full"] == MIN_PASSES["fwd"] + MIN_PASSES["bwd"]
    # Eval drops the statistics pass (one pass over z) from both.
    assert eager_minus_fused(False) == (EAGER_PASSES["fwd"] - MIN_PASSES["fwd"]) * pass_bytes
