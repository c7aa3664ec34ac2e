"""BatchNorm (training) + residual add + ReLU on CPU: eager PyTorch vs the fused C++ ops.

Run with ``pytest benchmarks/test_bench_bn_act.py --benchmark-only``. One pytest-benchmark group
per case (shape, memory format, mode), two providers:

- ``eager``: ``relu(F.batch_norm(z, training=True) + residual)``, backward by autograd;
- ``cpu``: ``bn_stats -> rsqrt -> scale/shift -> bn_act_fwd`` and ``bn_act_bwd``
  (torch.ops.fusedres, csrc/cpu).

Modes: ``fwd``, ``bwd`` (gradients of z, gamma, beta and the residual for a fixed dy) and
``fwdbwd``. ``extra_info["GB/s"]`` counts the bytes a perfectly fused implementation must move,
in tensor passes of the [N, C, H, W] activation: forward 4 (read z for the statistics, read z and
the residual, write y), backward 5 (read dy, y and z, write dz and dresidual), both 9.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import record
from fusedres import _ext

EPS = 1e-5
SHAPES = [(8, 512, 28, 28), (8, 256, 56, 56), (8, 1024, 14, 14)]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
PASSES = {"fwd": 4, "bwd": 5, "fwdbwd": 9}
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


def eager_fns(case):
    z = case.z.clone().requires_grad_()
    res = case.res.clone().requires_grad_()
    gamma = case.gamma.clone().requires_grad_()
    beta = case.beta.clone().requires_grad_()
    leaves = (z, gamma, beta, res)

    def fwd():
        out = F.batch_norm(z, case.running_mean, case.running_var, gamma, beta, True, 0.1, EPS)
        return torch.relu(out + res)

    y = fwd()

    def bwd():
        return torch.autograd.grad(y, leaves, case.dy, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(fwd(), leaves, case.dy)

    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}


def fused_fns(case):
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

    def fwdbwd():
        y, mean, invstd = fwd()
        return ops.bn_act_bwd(case.dy, y, case.z, mean, invstd, case.gamma, True, True, True)

    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}


PROVIDERS = {"eager": eager_fns, "cpu": fused_fns}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", list(PASSES))
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_act(benchmark, shape, fmt, mode, provider):
    if provider == "cpu" and not _ext.extension_loaded():
        pytest.skip(f"cpu provider needs the C++ extension: {_ext.EXTENSION_ERROR}")
    torch.manual_seed(0)
    case = Case(shape, FORMATS[fmt])
    fn = PROVIDERS[provider](case)[mode]
    benchmark.group = f"bn_act {'x'.join(map(str, shape))} {fmt} {mode}"
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    record(benchmark, provider, PASSES[mode] * case.z.numel() * case.z.element_size())
