"""Per-kernel benchmarks at ResNet-50 shapes: eager PyTorch, the triton and cuda backends.

One pytest-benchmark group per (op, mode, shape); the providers share it:

- ``eager``: the BatchNorm ops as fusedres.reference composes them in plain PyTorch ops (no
  upcast); a convolution unit as eager PyTorch runs it: F.conv2d, F.batch_norm, + residual,
  ReLU, backward by autograd;
- ``triton``: the Triton kernels (fusedres/kernels behind torch.ops.fusedres_triton);
- ``cuda``: the CUDA kernels (torch.ops.fusedres on CUDA tensors, csrc/cuda; cuDNN convolutions);
- ``cpu``: the C++ CPU kernels (torch.ops.fusedres on CPU tensors, csrc/cpu), so that the file
  also runs, small, without a GPU.

The convolution units of the fused providers are their backend's unit ops (one op per phase,
autograd on the op): ``unit_train`` forward and its backward, and in eval the inference runner
(``infer_runner``: BatchNorm folded into the convolution), made once for the input's signature
as fusedres.ops.unit's inference plans make it.

Unusable providers are skipped with the reason (triton is not timed on a CPU). Ops: bn_stats,
bn_act_fwd, bn_act_bwd (``memory_bound`` in extra_info: scripts/gpu_validate.sh compares their
GB/s with the device's copy bandwidth), and a convolution unit (conv -> BN -> + residual ->
ReLU) in four modes: training forward, eval forward (BN folded into scale/shift), training
backward and full (training forward + backward).

extra_info: the bytes a case must move at least, the same for every provider (each input read
once, each output written once; a BatchNorm training backward makes two passes, see
``test_bn_act_bwd``), the GB/s that makes (compare with the copy bandwidth: a memory-bound
kernel is done when it is near it), and for the convolutions TFLOP/s.

Timing: the providers of a group in the same rounds (conftest.Interleaved); a round launches
the op ``launches`` times back to back and synchronises once, so the median is the time per
launch with the synchronisation amortised, as inside a network: the device time, or the host's
launch cost where a kernel is shorter than that. Rounds of at least ~2 GB of traffic on a GPU,
one launch per round on CPU.

    pytest benchmarks/test_bench_triton.py --benchmark-only

Shapes: batch 64, bf16, channels_last on a GPU; batch 2, float32 on CPU (FUSEDRES_BENCH_BATCH
overrides the batch).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fusedres
from _providers import DEVICE, GPU, interleave_functions, provider_params, rounds, warmup
from conftest import record
from fusedres.backend import ConvParams, conv_output_hw
from fusedres.report import bn_ops

BATCH = int(os.environ.get("FUSEDRES_BENCH_BATCH", "64" if GPU else "2"))
DTYPE = torch.bfloat16 if GPU else torch.float32
EPS = 1e-5
ROUNDS, WARMUP = 20, 3
# Bytes of traffic per timed round on a GPU (~0.7 ms at 3 TB/s), at most this many launches.
ROUND_BYTES, MAX_LAUNCHES = 2e9, 50
# (name, Cin, H, W, Cout, kernel, stride): the ResNet-50 convolutions that dominate its time.
CONVS = [
    ("stem-7x7s2", 3, 224, 224, 64, 7, 2),
    ("l1-1x1", 64, 56, 56, 64, 1, 1),
    ("l1-3x3", 64, 56, 56, 64, 3, 1),
    ("l1-1x1-expand", 64, 56, 56, 256, 1, 1),
    ("l2-3x3s2", 128, 56, 56, 128, 3, 2),
    ("l3-3x3", 256, 14, 14, 256, 3, 1),
    ("l4-1x1-expand", 512, 7, 7, 2048, 1, 1),
]
# (name, C, H, W): BatchNorm tensors (a conv output) of ResNet-50.
ACTIVATIONS = [("l1-256x56", 256, 56, 56), ("l2-512x28", 512, 28, 28),
               ("l3-1024x14", 1024, 14, 14), ("l4-2048x7", 2048, 7, 7)]
PROVIDERS = ["eager", "triton", "cuda", "cpu"]


def _run(benchmark, request, interleaved, make_fn, bytes_moved: int, flops: int = 0, **info):
    """Times the group (see the module docstring) and records bytes, GB/s, TFLOP/s and ``info``.

    Args:
        make_fn: ``make_fn(provider) -> function``: one launch of the op.
    """
    provider = request.node.callspec.params["provider"]
    launches = min(MAX_LAUNCHES, math.ceil(ROUND_BYTES / bytes_moved)) if GPU else 1
    first_call_s = interleave_functions(request, benchmark, interleaved, make_fn,
                                        n_rounds=rounds(ROUNDS), n_warmup=warmup(WARMUP),
                                        calls=launches)
    record(benchmark, provider, bytes_moved, flops,
           device=torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
           dtype=str(DTYPE).removeprefix("torch."), batch=BATCH, launches_per_round=launches,
           first_call_s=first_call_s, backend=provider, **info)


def _act(c, h, w):
    return torch.randn(BATCH, c, h, w, device=DEVICE, dtype=DTYPE).to(
        memory_format=torch.channels_last)


def _channel(c, lo=0.5, hi=1.5):
    return torch.empty(c, device=DEVICE).uniform_(lo, hi)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("provider", provider_params("kernels", PROVIDERS))
@pytest.mark.parametrize("shape", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_bn_stats(benchmark, request, interleaved, shape, provider):
    name, c, h, w = shape
    benchmark.group = f"bn_stats-{name}"
    z = _act(c, h, w)
    _run(benchmark, request, interleaved, lambda p: lambda: bn_ops(p).bn_stats(z),
         _nbytes(z), memory_bound=True)


@pytest.mark.parametrize("provider", provider_params("kernels", PROVIDERS))
@pytest.mark.parametrize("shape", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_bn_act_fwd(benchmark, request, interleaved, shape, provider):
    name, c, h, w = shape
    benchmark.group = f"bn_act_fwd-{name}"
    z, res = _act(c, h, w), _act(c, h, w)
    scale, shift = _channel(c), _channel(c, -0.5, 0.5)
    # read z and the residual, write y
    _run(benchmark, request, interleaved,
         lambda p: lambda: bn_ops(p).bn_act_fwd(z, scale, shift, res, True),
         3 * _nbytes(z), memory_bound=True)


@pytest.mark.parametrize("provider", provider_params("kernels", PROVIDERS))
@pytest.mark.parametrize("shape", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_bn_act_bwd(benchmark, request, interleaved, shape, provider):
    name, c, h, w = shape
    benchmark.group = f"bn_act_bwd-{name}"
    z, dy = _act(c, h, w), _act(c, h, w)
    y = torch.relu(_act(c, h, w))
    mean, invstd, gamma = _channel(c, -0.1, 0.1), _channel(c), _channel(c)
    # dz needs sums over the whole batch first: two passes at least. Read dy, y and z, write
    # dresidual; read dresidual and z, write dz.
    _run(benchmark, request, interleaved,
         lambda p: lambda: bn_ops(p).bn_act_bwd(dy, y, z, mean, invstd, gamma, True, True,
                                                 True),
         7 * _nbytes(z), memory_bound=True)


class ConvUnit:
    """Inputs of one convolution unit at a CONVS shape, and its timed functions per provider.

    x [N, Cin, H, W], weight [Cout, Cin, k, k], residual and dy [N, Cout, Ho, Wo] (channels_last,
    DTYPE); gamma, beta, scale, shift [Cout] (float32).
    """

    def __init__(self, case):
        _, cin, h, w, cout, k, stride = case
        self.x = _act(cin, h, w)
        self.weight = (torch.randn(cout, cin, k, k, device=DEVICE) / (cin * k * k) ** 0.5).to(
            DTYPE).contiguous(memory_format=torch.channels_last)
        self.conv = ConvParams((stride, stride), (k // 2, k // 2), (1, 1), 1)
        ho, wo = conv_output_hw((h, w), (k, k), self.conv.stride, self.conv.padding, (1, 1))
        self.res, self.dy = _act(cout, ho, wo), _act(cout, ho, wo)
        self.gamma, self.beta = _channel(cout), _channel(cout, -0.5, 0.5)
        self.scale, self.shift = _channel(cout), _channel(cout, -0.5, 0.5)
        self.flops = 2 * self.res.numel() * cin * k * k
        xw = _nbytes(self.x, self.weight)
        out = _nbytes(self.res)
        #: least bytes per mode: each input read once, each output written once
        self.bytes = {
            "train_fwd": xw + 3 * out,        # read x, w, residual; write z, y
            "eval_fwd": xw + 2 * out,         # read x, w, residual; write y
            "train_bwd": 2 * xw + 4 * out,    # read dy, y, z, x, w; write dx, dw, dresidual
        }
        self.bytes["train_full"] = self.bytes["train_fwd"] + self.bytes["train_bwd"]

    def eager(self, mode: str):
        """F.conv2d -> F.batch_norm -> + residual -> ReLU; backward by autograd."""
        leaves = [t.detach().requires_grad_() for t in (self.x, self.weight, self.gamma,
                                                         self.beta, self.res)]
        x, weight, gamma, beta, res = leaves
        stride, padding = self.conv.stride, self.conv.padding
        if mode == "eval_fwd":
            # Running statistics that make BatchNorm the fused providers' z * scale + shift.
            mean = torch.zeros_like(self.scale)
            var = torch.full_like(self.scale, 1 - EPS)

            def fwd():
                with torch.inference_mode():
                    z = F.conv2d(self.x, self.weight, None, stride, padding)
                    y = F.batch_norm(z, mean, var, self.scale, self.shift, False, 0.0, EPS)
                    return torch.relu(y + self.res)
            return fwd

        def fwd():
            z = F.conv2d(x, weight, None, stride, padding)
            return torch.relu(F.batch_norm(z, None, None, gamma, beta, True, 0.0, EPS) + res)

        if mode == "train_fwd":
            return fwd
        if mode == "train_bwd":
            y = fwd()
            return lambda: torch.autograd.grad(y, leaves, self.dy, retain_graph=True)
        return lambda: torch.autograd.grad(fwd(), leaves, self.dy)

    def fused(self, backend, mode: str):
        """The backend's unit ops, as fusedres.ops.unit calls them: ``unit_train`` (its
        backward by autograd, registered on the op) and, in eval, the runner of
        ``infer_runner`` (made once, as an inference plan) with the running statistics that
        make BatchNorm ``z * scale + shift``."""
        cout = self.scale.numel()
        if mode == "eval_fwd":
            # The module that owns the weight keys the backend's fold cache.
            conv = torch.nn.Conv2d(self.weight.shape[1], cout, self.weight.shape[2],
                                   self.conv.stride, self.conv.padding, bias=False, device=DEVICE)
            conv.weight = torch.nn.Parameter(self.weight, requires_grad=False)
            mean = torch.zeros_like(self.scale)
            var = torch.full_like(self.scale, 1 - EPS)

            with torch.inference_mode():
                run = backend.infer_runner(conv, self.x, conv.weight, self.scale, self.shift,
                                           self.res, mean, var, self.conv, True, EPS)

            def infer():
                with torch.inference_mode():
                    return run(self.x, self.res, False)
            return infer
        leaves = [t.detach().requires_grad_() for t in (self.x, self.weight, self.gamma,
                                                         self.beta, self.res)]
        x, weight, gamma, beta, res = leaves
        running_mean, running_var = torch.zeros_like(self.gamma), torch.ones_like(self.gamma)
        tracked = torch.zeros((), dtype=torch.long, device=DEVICE)

        def fwd():
            return backend.unit_train(x, weight, gamma, beta, res, running_mean, running_var,
                                      tracked, self.conv, True, 0.1, EPS)

        if mode == "train_fwd":
            return fwd
        if mode == "train_bwd":
            y = fwd()
            return lambda: torch.autograd.grad(y, leaves, self.dy, retain_graph=True)
        return lambda: torch.autograd.grad(fwd(), leaves, self.dy)


@pytest.mark.parametrize("provider", provider_params("kernels", PROVIDERS))
@pytest.mark.parametrize("case", CONVS, ids=[c[0] for c in CONVS])
# The training step's unit first: a stage cut by its time limit (scripts/gpu_validate.sh) keeps it.
@pytest.mark.parametrize("mode", ["train_full", "train_fwd", "train_bwd", "eval_fwd"])
def test_conv_unit(benchmark, request, interleaved, mode, case, provider):
    """One convolution unit; training modes use batch statistics."""
    benchmark.group = f"conv_{mode}-{case[0]}"
    unit = ConvUnit(case)
    passes = {"train_fwd": 1, "eval_fwd": 1, "train_bwd": 2, "train_full": 3}[mode]
    _run(benchmark, request, interleaved,
         lambda p: unit.eager(mode) if p == "eager" else unit.fused(fusedres.get_backend(p), mode),
         unit.bytes[mode], passes * unit.flops, mode=mode)
