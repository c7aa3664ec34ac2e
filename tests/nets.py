"""Small fused networks and the helpers that train and compare them with their eager twins.

Shared by the ecosystem tests (tests/test_ecosystem.py) and the triton backend's
(tests/kernels/test_triton_backend.py); :func:`assert_inference_plan_folds_once` also by the cuda
backend's inference runner tests (tests/test_cuda_inference_runner.py).
"""

import copy

import torch
import torch.nn as nn

import fusedres
from conftest import assert_oracle_close
from fusedres import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU, reference
from fusedres.ops import fold


def small_net(backend: str) -> nn.Sequential:
    """Stem unit + BasicBlock (stride 2, downsample) + Bottleneck + head: [N, 3, 16, 16] -> [N, 5].

    One BatchNorm uses momentum=None (cumulative average), the path that reads
    num_batches_tracked.
    """
    torch.manual_seed(0)
    net = nn.Sequential(
        FusedConvBNReLU(3, 8, 3, stride=2, backend=backend),
        FusedBasicBlock(8, 16, stride=2, backend=backend,
                        downsample=nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))),
        FusedBottleneck(16, 4, backend=backend),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    net[1].bn1.momentum = None
    for m in net.modules():  # non-trivial affine parameters, so their gradients matter
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net


def fused_eager_pair(backend: str):
    """(small_net on ``backend``, its eager twin with the same parameters and buffers)."""
    fused = small_net(backend)
    return fused, fusedres.to_eager(copy.deepcopy(fused))


def train_step(model, x, target, n_calls=1):
    """Forward (n_calls times, so running statistics move more than once) + backward."""
    for _ in range(n_calls):
        out = model(x)
    (out.float() * target).sum().backward()
    return out


def assert_models_close(a: nn.Module, b: nn.Module, rtol: float = 1e-4, what: str = ""):
    """Parameter gradients (relative norm error) and buffers of two twin models agree."""
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None or q.grad is not None:
            err = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
            assert err <= rtol, f"{what} grad of {name}: relative error {err:.2e}"
    for (name, u), v in zip(a.named_buffers(), b.buffers()):
        assert torch.allclose(u.double(), v.double(), rtol=rtol, atol=1e-6), f"{what} buffer {name}"


def assert_inference_plan_folds_once(monkeypatch, fused: nn.Module, eager: nn.Module,
                                     x64: torch.Tensor) -> None:
    """A fused unit's inference plan folds when it is made, not per call, and an in-place change
    of the conv weight, gamma, beta or a running statistic makes a new plan whose output follows
    it (against ``eager``, changed alike, and the float64 oracle).

    Args:
        fused, eager: a FusedConvBNReLU in eval (float32) and its eager twin.
        x64: its float64 input [N, Cin, H, W].
    """
    folds = []
    original = fold.fold_conv_bn

    def counting(*args, **kwargs):
        folds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fold, "fold_conv_bn", counting)
    x = x64.float()
    changes = [("conv.weight", lambda m: m.conv.weight.mul_(1.5)),
               ("bn.weight", lambda m: m.bn.weight.add_(0.25)),
               ("bn.bias", lambda m: m.bn.bias.sub_(0.5)),
               ("bn.running_mean", lambda m: m.bn.running_mean.add_(0.3)),
               ("bn.running_var", lambda m: m.bn.running_var.mul_(2.0))]
    with torch.no_grad():
        fused(x)
        assert len(folds) == 1
        for _ in range(3):
            fused(x)
        assert len(folds) == 1, "a call through the plan folded again"
        for what, change in changes:
            change(fused)
            change(eager)
            assert_oracle_close(fused(x), eager(x), reference.upcast(eager)(x64),
                                name=f"y after {what}")
        assert len(folds) == 1 + len(changes)
