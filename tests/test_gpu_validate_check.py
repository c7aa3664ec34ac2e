"""scripts/gpu_validate_check.py's masking of inner ReLU kinks (``_inner_kink_reach``).

A block's gradient check zeroes dy wherever an inner pre-activation near 0 can reach the output,
so that a fused run landing on the other side of that kink cannot move any gradient. Shown here
in float64 on the CPU: flipping every near-kink inner pre-activation leaves every gradient of an
eval block unchanged under the masked dy, and changes them under a dy that masks only the last
ReLU.
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

from fusedres import reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
from gpu_validate_check import _inner_kink_reach  # noqa: E402

BAND = 0.05  # wide, so that a small block has near-kink elements to flip


def _flip_near_kinks(block: nn.Module, depth: int):
    """Hooks negating every inner pre-activation within BAND of 0: the other side of its ReLU."""
    return [getattr(block, f"bn{i}").register_forward_hook(
        lambda _m, _i, out: torch.where(out.abs() < BAND, -out, out)) for i in range(1, depth)]


def _grads(block: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list:
    x = x.clone().requires_grad_()
    params = list(block.parameters())
    return torch.autograd.grad(block(x), [x, *params], dy)


@pytest.mark.parametrize("kind", ["bottleneck", "basic", "bottleneck-stride2"])
def test_masked_dy_makes_inner_kink_flips_harmless_in_eval(kind):
    torch.manual_seed(0)
    if kind == "basic":
        block, depth, x = reference.BasicBlock(8, 8), 2, torch.randn(2, 8, 6, 6)
    else:
        stride = 2 if kind.endswith("stride2") else 1
        down = nn.Sequential(nn.Conv2d(16, 16, 1, stride, bias=False), nn.BatchNorm2d(16))
        block = reference.Bottleneck(16, 4, stride, down if stride == 2 else None)
        depth, x = 3, torch.randn(2, 16, 7, 7)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            # running statistics and shifts that put many pre-activations near 0
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    block = block.double().eval()
    x = x.double()
    with torch.no_grad():
        y, reach = _inner_kink_reach(copy.deepcopy(block), (x,), BAND)
    assert reach is not None and reach.shape == (y.shape[0], 1, *y.shape[2:])
    assert 0 < reach.double().mean() < 1, "the case must hold near-kink elements and free pixels"
    dy_last = torch.randn_like(y).masked_fill(y.abs() < BAND, 0.0)
    dy = dy_last.masked_fill(reach, 0.0)

    flipped = copy.deepcopy(block)
    hooks = _flip_near_kinks(flipped, depth)
    for want, got in zip(_grads(block, x, dy), _grads(flipped, x, dy)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # without the inner mask the flips do move the gradients: the test can fail
    moved = [not torch.allclose(g, w, rtol=1e-9, atol=1e-12)
             for w, g in zip(_grads(block, x, dy_last), _grads(flipped, x, dy_last))]
    assert any(moved)
    for h in hooks:
        h.remove()


def test_a_unit_has_no_inner_kinks():
    unit = reference.ConvBNAct(4, 6, 3, 1).double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    y, reach = _inner_kink_reach(unit, (x,), BAND)
    assert reach is None
    torch.testing.assert_close(y, unit(x))
