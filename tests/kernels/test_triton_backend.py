"""The ``triton`` backend end to end: registration, one unit and whole blocks vs the oracle.

Units and blocks run forward + backward on backend="triton" and are compared, output by output
and gradient by gradient (and running statistics), with the eager composition in the same dtype
and the fp64 oracle (docs/design.md section 6).
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedres
from conftest import assert_oracle_close
from nets import (assert_inference_plan_folds_once, assert_models_close, fused_eager_pair,
                  train_step)
from fusedres import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU, reference
from fusedres.backend import get_backend, resolve

from .conftest import DEVICE, DTYPES

# Half-width of the band around the ReLU kink where dy is zeroed: a pre-activation that close to
# 0 may round to either side in the tested dtype and flip the mask (a step function).
KINK_BAND = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def test_registered_and_usable_here():
    backend = get_backend("triton")
    ok, why = backend.availability()
    assert ok, why
    assert DEVICE in backend.device_types
    assert resolve("triton", torch.device(DEVICE)) is backend


def test_import_fusedres_does_not_import_triton():
    code = ("import sys, fusedres; fusedres.available_backends(); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)


def _run(module, x, residual, dy):
    """Forward + backward; every output, gradient and BN buffer (running statistics and
    num_batches_tracked) by name."""
    x = x.detach().clone().requires_grad_()
    args = (x,)
    if residual is not None:
        residual = residual.detach().clone().requires_grad_()
        args = (x, residual)
    y = module(*args)
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad}
    if residual is not None:
        out["dresidual"] = residual.grad
    for name, p in module.named_parameters():
        out["d." + name] = p.grad
    for name, b in module.named_buffers():
        out[name] = b.clone()
    return out


def _compare(fused, eager, x, residual, dtype, training, grad_norm="max"):
    """Runs fused (dtype), eager (dtype) and the fp64 oracle; applies the tolerance rule.

    Integer buffers (num_batches_tracked) must equal the oracle's exactly. ``grad_norm`` is the
    norm of the rule for the gradients (dx, dresidual, d.<parameter>): "rel_l2" where inner ReLU
    kinks make single entries noise (see conftest.assert_oracle_close).
    """
    oracle = reference.upcast(eager)
    for m in (fused, eager, oracle):
        m.train(training)
    x64 = x.double()
    res64 = None if residual is None else residual.double()
    with torch.no_grad():
        # On a copy: in training this forward moves the running statistics, which the three
        # runs below must each move once from the same start.
        y64 = copy.deepcopy(oracle)(*((x64,) if res64 is None else (x64, res64)))
    dy = torch.randn(y64.shape, dtype=torch.float64, device=x.device)
    # Only the last ReLU's kink matters for the test's dy (inner kinks are averaged out).
    dy = dy.masked_fill(y64.abs() < KINK_BAND[dtype], 0.0)
    cast = (lambda t: None if t is None else t.to(dtype))
    got = _run(fused, cast(x64), cast(res64), cast(dy))
    ref = _run(eager, cast(x64), cast(res64), cast(dy))
    exact = _run(oracle, x64, res64, dy)
    assert got.keys() == exact.keys()
    for key in exact:
        assert got[key] is not None, f"{key} was not computed"
        if not exact[key].is_floating_point():
            assert torch.equal(got[key].cpu(), exact[key].cpu()), \
                f"{key}: {got[key].tolist()} != {exact[key].tolist()}"
            continue
        norm = grad_norm if key in ("dx", "dresidual") or key.startswith("d.") else "max"
        assert_oracle_close(got[key].cpu(), ref[key].cpu(), exact[key].cpu(), name=key, norm=norm)
    return got


# (Cin, H, W, Cout, kernel, stride, groups)
UNITS = {
    "3x3": (8, 7, 6, 12, 3, 1, 1),
    "1x1s2": (16, 6, 5, 8, 1, 2, 1),
    "7x7s2": (3, 11, 9, 8, 7, 2, 1),
    "3x3-groups": (8, 6, 6, 8, 3, 1, 4),
}


# (unit, has_residual, relu): every flag combination on one geometry, the others with both on
# (the kernels' flag paths are covered in test_bn_kernels/test_conv_kernel; interpreter time).
UNIT_CASES = [("3x3", True, True), ("3x3", False, True), ("3x3", False, False),
              ("1x1s2", True, True), ("7x7s2", False, True), ("3x3-groups", True, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", UNIT_CASES,
                         ids=lambda c: f"{c[0]}-{'res' if c[1] else 'nores'}-"
                                       f"{'relu' if c[2] else 'norelu'}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unit(dtype, case, training):
    name, has_residual, relu = case
    cin, h, w, cout, k, stride, groups = UNITS[name]
    eager = reference.ConvBNAct(cin, cout, k, stride, groups=groups, relu=relu)
    _randomize_bn(eager.bn)
    eager = eager.to(DEVICE, dtype)
    fused = FusedConvBNReLU(cin, cout, k, stride, groups=groups, relu=relu, backend="triton")
    fused.to(DEVICE, dtype).load_state_dict(eager.state_dict())
    x = torch.randn(2, cin, h, w, device=DEVICE).to(memory_format=torch.channels_last)
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    res = torch.randn(2, cout, ho, wo, device=DEVICE) if has_residual else None
    got = _compare(fused, eager, x, res, dtype, training)
    assert got["y"].is_contiguous(memory_format=torch.channels_last)


def test_unit_nchw_input_keeps_nchw():
    eager = reference.ConvBNAct(5, 7, 3, 1).to(DEVICE)
    fused = FusedConvBNReLU(5, 7, 3, 1, backend="triton").to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    got = _compare(fused, eager, torch.randn(2, 5, 6, 7, device=DEVICE), None, torch.float32,
                   training=True)
    assert got["y"].is_contiguous()


def test_eval_with_frozen_bn_params_and_trainable_weight():
    """Eval forward writes no z; backward must still give dW and dx (and skip dgamma)."""
    eager = reference.ConvBNAct(6, 8, 3, 1).to(DEVICE)
    _randomize_bn(eager.bn)
    fused = FusedConvBNReLU(6, 8, 3, 1, backend="triton").to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    eager.eval()
    for m in (fused, eager):
        m.bn.requires_grad_(False)
    x = torch.randn(2, 6, 5, 5, device=DEVICE).to(memory_format=torch.channels_last)
    grads = []
    for m in (fused, eager):
        xi = x.clone().requires_grad_()
        m(xi).sum().backward()
        grads.append((xi.grad, m.conv.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _downsample(inplanes, outplanes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False),
                         nn.BatchNorm2d(outplanes))


# (class, eager class, inplanes, planes, stride, groups, base_width, H)
BLOCKS = {
    "basic-s2-downsample": (FusedBasicBlock, reference.BasicBlock, 8, 16, 2, 1, 64, 9),
    "basic-identity": (FusedBasicBlock, reference.BasicBlock, 8, 8, 1, 1, 64, 6),
    "bottleneck-s2-downsample": (FusedBottleneck, reference.Bottleneck, 16, 4, 2, 1, 64, 7),
    "resnext-bottleneck": (FusedBottleneck, reference.Bottleneck, 32, 8, 1, 4, 16, 5),
}


# Blocks add wiring, not kernel paths: under the interpreter (time) every block runs in fp32,
# and these also in fp16, in training (the units cover the other fp16 paths).
INTERP_FP16_BLOCKS = ("basic-s2-downsample", "bottleneck-s2-downsample")


def _block_cases():
    """pytest params (dtype, block name, training): on a GPU every combination."""
    cases = []
    for training in (True, False):
        for name in BLOCKS:
            for dtype in DTYPES:
                if (DEVICE == "cuda" or dtype == torch.float32
                        or (training and name in INTERP_FP16_BLOCKS)):
                    mode = "train" if training else "eval"
                    cases.append(pytest.param(dtype, name, training, id=f"{mode}-{name}-{dtype}"))
    return cases


@pytest.mark.parametrize("dtype,block,training", _block_cases())
def test_block(dtype, block, training):
    """Forward + backward of a block. In fp16/bf16 some pre-activations of the two inner ReLUs
    round to the other side of 0 (in eager and fused runs alike), each moving single gradient
    entries by O(1), so gradients are compared by relative L2 error there; on a GPU the blocks
    also run 4x the batch at 3x the size, enough of those flips for the error ratio to be
    stable (at the interpreter's size, bf16 failed in ~10% of seeds, measured on the CPU
    kernels; fp16 in none)."""
    fused_cls, eager_cls, inplanes, planes, stride, groups, base_width, h = BLOCKS[block]
    batch, h = (8, 3 * h) if DEVICE == "cuda" else (2, h)
    out = planes * eager_cls.expansion
    ds = _downsample(inplanes, out, stride) if (stride != 1 or inplanes != out) else None
    eager = eager_cls(inplanes, planes, stride, copy.deepcopy(ds), groups, base_width)
    for mod in eager.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _randomize_bn(mod)
    eager = eager.to(DEVICE, dtype)
    fused = fused_cls(inplanes, planes, stride, copy.deepcopy(ds), groups, base_width,
                      backend="triton").to(DEVICE, dtype)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(batch, inplanes, h, h, device=DEVICE).to(memory_format=torch.channels_last)
    _compare(fused, eager, x, None, dtype, training,
             grad_norm="max" if dtype == torch.float32 else "rel_l2")


# -- Inference: no gradient wanted, BatchNorm folded, one runner per input signature ----------


def _eval_twins(case, dtype):
    """(fused unit on triton, its eager twin), eval, with random BatchNorm state."""
    name, _, relu = case
    cin, _, _, cout, k, stride, groups = UNITS[name]
    eager = reference.ConvBNAct(cin, cout, k, stride, groups=groups, relu=relu)
    _randomize_bn(eager.bn)
    eager = eager.to(DEVICE, dtype).eval()
    fused = FusedConvBNReLU(cin, cout, k, stride, groups=groups, relu=relu, backend="triton")
    fused.to(DEVICE, dtype).load_state_dict(eager.state_dict())
    return fused.eval(), eager


def _eval_inputs(case, batch=2):
    """x [batch, Cin, H, W] and the residual (or None) of a UNITS case, float64, channels_last."""
    name, has_residual, _ = case
    cin, h, w, cout, k, stride, _ = UNITS[name]
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    x = torch.randn(batch, cin, h, w, device=DEVICE, dtype=torch.float64)
    res = (torch.randn(batch, cout, ho, wo, device=DEVICE, dtype=torch.float64)
           .contiguous(memory_format=torch.channels_last) if has_residual else None)
    return x.contiguous(memory_format=torch.channels_last), res


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode],
                         ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", UNIT_CASES,
                         ids=lambda c: f"{c[0]}-{'res' if c[1] else 'nores'}-"
                                       f"{'relu' if c[2] else 'norelu'}")
def test_inference_unit(dtype, case, no_grad):
    """Eval without gradients (the folded inference runner): y against eager and the float64
    oracle, the same values from the plan's second call, channels_last kept; under
    inference_mode too (the GPU validation's network check runs there)."""
    fused, eager = _eval_twins(case, dtype)
    x64, res64 = _eval_inputs(case)
    args = [x64] + ([res64] if res64 is not None else [])
    with no_grad():
        exact = reference.upcast(eager)(*args)
        expected = eager(*(a.to(dtype) for a in args))
        first = fused(*(a.to(dtype) for a in args))
        second = fused(*(a.to(dtype) for a in args))
    assert_oracle_close(first, expected, exact, name="y")
    assert torch.equal(first, second)
    assert first.is_contiguous(memory_format=torch.channels_last)


def test_inference_unit_nchw_input_keeps_nchw():
    fused, eager = _eval_twins(("3x3", True, True), torch.float32)
    x64, res64 = _eval_inputs(("3x3", True, True))
    x64, res64 = x64.contiguous(), res64.contiguous()
    with torch.no_grad():
        got = fused(x64.float(), res64.float())
        expected = eager(x64.float(), res64.float())
        exact = reference.upcast(eager)(x64, res64)
    assert got.is_contiguous()
    assert_oracle_close(got, expected, exact, name="y")


def _unit_runner(fused, x, residual):
    """The triton backend's inference runner of ``fused`` for x and residual's signature."""
    from fusedres.backend import ConvParams
    conv, bn = fused.conv, fused.bn
    return get_backend("triton").infer_runner(
        conv, x, conv.weight, bn.weight, bn.bias, residual, bn.running_mean, bn.running_var,
        ConvParams(conv.stride, conv.padding, conv.dilation, conv.groups), fused.relu, bn.eps)


def test_inference_runner_writes_into_a_dead_residual_only():
    """``residual_is_dead``: y takes the residual's memory (each output element is written by
    the program that read its residual element); otherwise the residual is left as it was."""
    case = ("3x3", True, True)
    fused, eager = _eval_twins(case, torch.float32)
    x64, res64 = _eval_inputs(case)
    x, residual = x64.float(), res64.float()
    with torch.no_grad():
        expected = eager(x, residual)
        exact = reference.upcast(eager)(x64, res64)
        run = _unit_runner(fused, x, residual)
        kept = residual.clone()
        y = run(x, residual, False)
        assert y.data_ptr() != residual.data_ptr() and torch.equal(residual, kept)
        assert_oracle_close(y, expected, exact, name="y (residual alive)")
        dead = residual.clone()
        y_dead = run(x, dead, True)
    assert y_dead.data_ptr() == dead.data_ptr()
    assert torch.equal(y_dead, y)


def test_inference_plan_folds_once_and_follows_state_changes(monkeypatch):
    """The plan's runner folds when it is made, not per call; an in-place change of the conv
    weight, gamma, beta or a running statistic makes a new plan whose output follows it."""
    fused, eager = _eval_twins(("3x3", False, True), torch.float32)
    x64, _ = _eval_inputs(("3x3", False, True))
    assert_inference_plan_folds_once(monkeypatch, fused, eager, x64)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode],
                         ids=["no_grad", "inference_mode"])
def test_inference_block(no_grad):
    """A Bottleneck without gradients (three runners, the last adding the identity) against
    eager and the float64 oracle, twice (the block plan's second call)."""
    eager = reference.Bottleneck(16, 4)
    for mod in eager.modules():
        if isinstance(mod, nn.BatchNorm2d):
            _randomize_bn(mod)
    eager = eager.to(DEVICE).eval()
    fused = FusedBottleneck(16, 4, backend="triton").to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    x64 = torch.randn(2, 16, 5, 6, device=DEVICE, dtype=torch.float64)
    x64 = x64.contiguous(memory_format=torch.channels_last)
    with no_grad():
        exact = reference.upcast(eager)(x64)
        expected = eager(x64.float())
        got = [fused(x64.float()) for _ in range(2)]
    assert_oracle_close(got[0], expected, exact, name="y")
    assert torch.equal(got[0], got[1])


class _OpNames(TorchDispatchMode):
    """Records the name of every op dispatched under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_block_calls_its_launchers_directly_unless_something_may_trace(monkeypatch):
    """The block op's forward and backward call the launcher ops' and the unit backward op's
    implementations without the dispatcher on plain tensors, and the registered ops where a
    trace could meet the call (here a dispatch mode, which must see them; torch.compile,
    torch.export and fake tensors: the compile and export tests above, test_block's fake-tensor
    counts; batched gradients: the test below); the results are the same."""
    from fusedres.backends import triton as triton_backend
    from fusedres.ops import triton_library
    direct_calls = []

    def counting(original):
        def call(*args, **kwargs):
            direct_calls.append(original.__name__)
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(triton_library.direct, "conv2d_bn_train",
                        counting(triton_library.direct.conv2d_bn_train))
    monkeypatch.setattr(triton_backend, "_backward", counting(triton_backend._backward))
    block = FusedBottleneck(16, 4, backend="triton").to(DEVICE)
    block = block.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 16, 5, 5, device=DEVICE).to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    plain = block(x)
    plain_grads = torch.autograd.grad(plain, list(block.parameters()), dy)
    # One per unit, forward and backward.
    assert direct_calls == ["conv2d_bn_train"] * 3 + ["_backward"] * 3, direct_calls
    recorder = _OpNames()
    with recorder:
        recorded = block(x)
        recorded_grads = torch.autograd.grad(recorded, list(block.parameters()), dy)
    assert len(direct_calls) == 6, "a launcher ran unseen under a dispatch mode"
    assert recorder.names.count("fusedres_triton.conv2d_bn_train.default") == 3, recorder.names
    assert recorder.names.count("fusedres_triton.unit_backward.default") == 3, recorder.names
    # The running statistics moved twice in between; the output depends only on the batch.
    torch.testing.assert_close(recorded, plain)
    torch.testing.assert_close(recorded_grads, plain_grads)


def test_block_batched_gradients():
    """torch.autograd.grad(..., is_grads_batched=True) (jacobian(vectorize=True)) through a
    Bottleneck in training: dy reaches the block's backward as a batched tensor, which the
    kernels cannot take; the registered unit backward op, which vmap's fallback runs slice by
    slice, gives eager's gradients."""
    eager = reference.Bottleneck(16, 4).to(DEVICE).train()
    fused = FusedBottleneck(16, 4, backend="triton").to(DEVICE).train()
    fused.load_state_dict(eager.state_dict())
    x64 = torch.randn(2, 16, 4, 5, device=DEVICE, dtype=torch.float64)
    vs = torch.randn(3, 2, 16, 4, 5, device=DEVICE, dtype=torch.float64)
    grads = []
    for model, dtype in ((fused, torch.float32), (eager, torch.float32),
                         (reference.upcast(eager), torch.float64)):
        x = x64.to(dtype).requires_grad_()
        inputs = [x, *model.parameters()]
        grads.append(torch.autograd.grad(model(x), inputs, vs.to(dtype), is_grads_batched=True))
    names = ["x"] + [name for name, _ in fused.named_parameters()]
    for name, g_fused, g_eager, g_exact in zip(names, *grads):
        assert_oracle_close(g_fused, g_eager, g_exact, name=f"batched grad {name}")


def test_float64_is_refused_with_a_clear_error():
    fused = FusedConvBNReLU(3, 4, 3, backend="triton").to(DEVICE, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        fused(torch.randn(2, 3, 5, 5, dtype=torch.float64, device=DEVICE))


def test_global_backend_choice_reaches_triton(monkeypatch):
    from fusedres.backends import triton as triton_backend
    calls = []
    original = triton_backend.TritonBackend.unit_train

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(triton_backend.TritonBackend, "unit_train", spy)
    fusedres.set_backend("triton")
    FusedConvBNReLU(3, 4, 3).to(DEVICE)(torch.randn(2, 3, 5, 5, device=DEVICE))
    assert calls, "the fused triton path was not taken"


# -- torch.compile and torch.export ------------------------------------------------------------

@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_train_and_eval(compiler):
    """The triton ops are registered torch.library ops: fullgraph=True (a graph break raises)
    traces a fused network on this backend, training (two calls, forward + backward) and eval,
    and gives the eager twin's outputs, gradients and running statistics."""
    torch._dynamo.reset()
    fused, eager = (m.to(DEVICE) for m in fused_eager_pair("triton"))
    compiled = torch.compile(fused, fullgraph=True, backend=compiler)
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    target = torch.randn(4, 5, device=DEVICE)
    for _ in range(2):
        torch.testing.assert_close(train_step(compiled, x, target), train_step(eager, x, target),
                                   rtol=1e-4, atol=1e-5)
    assert_models_close(fused, eager, what=f"compiled ({compiler}) train")
    fused.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_export_eval_model():
    """torch.export of an eval-mode network on the triton backend keeps the fused ops (no
    decomposition into ATen) and gives the eager twin's logits."""
    fused, eager = (m.to(DEVICE) for m in fused_eager_pair("triton"))
    train_step(fused, torch.randn(4, 3, 16, 16, device=DEVICE), torch.randn(4, 5, device=DEVICE))
    fused.eval()
    eager.load_state_dict(fused.state_dict())
    eager.eval()
    program = torch.export.export(fused, (torch.randn(4, 3, 16, 16, device=DEVICE),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "fusedres_triton.unit_eval.default" in targets, sorted(targets)
    assert not {"aten.batch_norm.default", "aten.convolution.default"} & targets, sorted(targets)
    x = torch.randn(4, 3, 16, 16, device=DEVICE)
    torch.testing.assert_close(program.module()(x), eager(x), rtol=1e-5, atol=1e-6)
