"""Plans with autograd on (fusedres.modules, fusedres.ops.unit): once a fused block's training
call, or a unit's call with autograd on (training, frozen-BN fine-tuning), has passed every
check, a repeated call with the same signature and module state runs the op from the call it
prepared, skipping the checks (docs/design.md section 4).

These tests change each thing a plan's key holds, on a block or unit that has a plan and on a
twin whose plan is dropped before every call (the checked path, itself tested against the
float64 oracle in tests/test_block.py and tests/test_unit.py), and require the two to agree
bitwise (outputs, gradients, running statistics) and to take the same path. They also check that
a repeated call skips the checks, that a call the checks refuse still fails before any running
statistic changes, and that a plan does not keep its block alive.
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from conftest import CPU_FUSED_BACKENDS
from test_block import FrozenBatchNorm2d, make_input, make_pair
import fusedres
from fusedres import modules
from fusedres.ops import block as block_op
from fusedres.ops import unit as unit_module

F64 = torch.float64


def _step(block, x, checked=False, x_grad=True, autocast=False):
    """Forward + backward of a fixed output gradient; the checked path when ``checked``.

    Returns:
        {"y", "dx", "grad <parameter>", "<buffer>"..., "grad_fn"}.
    """
    if checked:
        modules._TRAIN_PLANS.pop(block, None)
    x = x.detach().clone().requires_grad_(x_grad)
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = block(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    if y.requires_grad:
        y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad, "grad_fn": type(y.grad_fn).__name__}
    out.update({f"grad {n}": p.grad for n, p in block.named_parameters() if p.grad is not None})
    out.update({n: b.clone() for n, b in block.named_buffers()})
    return out


def _assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


def _change(block, x, what, calls):
    """Changes one thing the training plan's key holds (or the global state it reads); returns
    the input to call with next. ``calls`` counts the hook's calls."""
    with torch.no_grad():
        if what == "momentum":
            block.bn1.momentum = 0.5
        elif what == "momentum_none":
            block.bn1.momentum = None  # a cumulative average over num_batches_tracked
        elif what == "eps":
            block.bn2.eps = 0.3
        elif what == "bn2_eval":
            block.bn2.eval()  # running statistics in one unit: the per-unit path
        elif what == "track_running_stats_off":
            block.bn1.track_running_stats = False  # batch statistics, no update
        elif what == "bn1_no_affine":
            block.bn1.weight = None
            block.bn1.bias = None
        elif what == "replaced_conv2_weight":
            block.conv2.weight = nn.Parameter(block.conv2.weight.detach() * -1.5)
        elif what == "replaced_bn2":
            block.bn2 = nn.BatchNorm2d(block.bn2.num_features).to(block.bn1.weight.dtype)
        elif what == "weights_frozen":
            block.requires_grad_(False)  # x still takes a gradient
        elif what == "conv2_hook":
            block.conv2.register_forward_hook(lambda m, args, out: calls.append(m))
        elif what == "batch_size":
            return torch.randn(3, *x.shape[1:], dtype=x.dtype)
        elif what == "float32":
            block.float()
            return x.float()
        elif what == "recompute_off":
            block.recompute = "off"
        elif what == "recompute_conv1":
            block.recompute = "conv1"
    return x


CHANGES = ["momentum", "momentum_none", "eps", "bn2_eval", "track_running_stats_off",
           "bn1_no_affine", "replaced_conv2_weight", "replaced_bn2", "weights_frozen",
           "conv2_hook", "batch_size", "float32", "recompute_off", "recompute_conv1",
           "recompute_env", "autocast", "global_backend", "no_gradient_anywhere"]


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("case", ["bottleneck-s2-downsample", "basic-identity"])
@pytest.mark.parametrize("what", CHANGES)
def test_train_plan_follows_what_its_key_holds(backend, case, what, monkeypatch):
    dtype = torch.float32 if what == "autocast" else F64  # autocast leaves float64 alone
    planned, _ = make_pair(case, backend, dtype=dtype)
    checked = copy.deepcopy(planned)
    x = make_input(case, dtype)
    # Without a gradient for x throughout, freezing the parameters changes only their flags.
    x_grad = what != "no_gradient_anywhere"
    for _ in range(2):
        _assert_same(_step(planned, x, x_grad=x_grad),
                     _step(checked, x, checked=True, x_grad=x_grad))
    assert modules._TRAIN_PLANS[planned].call.spec.backend == backend
    calls = {id(planned): [], id(checked): []}
    for block in (planned, checked):
        x_next = _change(block, x, what, calls[id(block)])
    if what == "recompute_env":
        planned.recompute = checked.recompute = None
        monkeypatch.setenv(block_op.RECOMPUTE_ENV, "0")
    if what == "global_backend":
        planned.backend = checked.backend = None
        fusedres.set_backend("eager")  # reset by conftest's autouse fixture
    autocast = what == "autocast"
    if not x_grad:
        planned.requires_grad_(False)
        checked.requires_grad_(False)
    apply = block_op._BlockFunction.apply
    op_calls = []
    monkeypatch.setattr(block_op._BlockFunction, "apply",
                        lambda *args: op_calls.append(args[0]) or apply(*args))
    for _ in range(2):
        got = _step(planned, x_next, x_grad=x_grad, autocast=autocast)
        _assert_same(got, _step(checked, x_next, checked=True, x_grad=x_grad, autocast=autocast))
    assert len(calls[id(planned)]) == len(calls[id(checked)])
    # What the change does, so that a plan that ignored it would have been caught: the path
    # (a stale plan would run the block op where the checks send the block unit by unit).
    op_path = what not in ("bn2_eval", "conv2_hook", "recompute_off", "recompute_env",
                           "global_backend", "no_gradient_anywhere")
    assert len(op_calls) == (4 if op_path else 0)
    assert (got["grad_fn"] == "_BlockFunctionBackward") == op_path, got["grad_fn"]
    if what == "conv2_hook":
        assert len(calls[id(planned)]) == 2
    if what == "autocast":
        assert got["y"].dtype == torch.bfloat16
    if what == "recompute_conv1":
        assert modules._TRAIN_PLANS[planned].call.spec.recompute_conv1 == (case != "basic-identity")


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_repeated_training_call_skips_the_checks(backend, monkeypatch):
    block, _ = make_pair("bottleneck-s2-downsample", backend)
    counts = {"_check_block": 0, "_block_call": 0}

    def counted(name):
        original = getattr(modules, name)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in counts:
        monkeypatch.setattr(modules, name, counted(name))
    x = make_input("bottleneck-s2-downsample")
    for _ in range(3):
        _step(block, x)
    assert counts == {"_check_block": 1, "_block_call": 1}
    block.bn3.momentum = 0.2  # a new key: checked once more
    _step(block, x)
    assert counts == {"_check_block": 2, "_block_call": 2}


def _refusal(block, x, what):
    """Input or state the checks refuse, with the error's text; x is the planned input."""
    if what == "negative_eps":
        block.bn2.eps = -1.0
        return x, "eps must be positive"
    if what == "wrong_channels":
        return torch.randn(2, x.shape[1] + 1, *x.shape[2:]), "channels"
    if what == "bn_shape":
        block.bn2.running_mean = torch.zeros(block.bn2.num_features + 1)
        return x, "running_mean has shape"
    # one value per channel after the stride-2 units
    return torch.randn(1, x.shape[1], 2, 2), "Expected more than 1 value per channel"


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("what", ["negative_eps", "wrong_channels", "bn_shape", "single_value"])
def test_refused_call_after_a_plan_changes_no_state(backend, what):
    block, _ = make_pair("bottleneck-s2-downsample", backend)
    x = make_input("bottleneck-s2-downsample")
    for _ in range(2):
        _step(block, x)
    assert block in modules._TRAIN_PLANS
    x_bad, message = _refusal(block, x, what)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=message):
        block(x_bad.requires_grad_())
    after = block.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_train_plan_does_not_keep_its_block_alive(backend):
    block, _ = make_pair("basic-identity", backend)
    x = make_input("basic-identity")
    for _ in range(2):
        _step(block, x)
    assert block in modules._TRAIN_PLANS
    ref = weakref.ref(block)
    del block
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_model_training_steps_run_from_plans_and_match_the_checked_path(backend, monkeypatch):
    """Three SGD steps of a FusedResNet with plans, and of a twin without (no key)."""
    torch.manual_seed(0)
    planned = fusedres.models.resnet18(num_classes=5, backend=backend).double()
    checked = copy.deepcopy(planned)
    x = torch.randn(2, 3, 32, 32, dtype=F64)

    def train(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [m for m in model.modules() if isinstance(m, fusedres.FusedBasicBlock)]

    assert all(b in modules._TRAIN_PLANS for b in train(planned))
    monkeypatch.setattr(modules, "block_train_key", lambda *args: None)
    assert not any(b in modules._TRAIN_PLANS for b in train(checked))
    expected = checked.state_dict()
    assert all(torch.equal(value, expected[k]) for k, value in planned.state_dict().items())


# -- units: conv_bn_act's plan with autograd on --------------------------------------------------

def _unit(kind, backend, dtype):
    """A FusedConvBNReLU (3x3, 6 -> 8 channels) training with batch statistics, or with a
    FrozenBatchNorm2d of eps 0.0 as COCO checkpoints have it (frozen-BN fine-tuning: running
    statistics, gradients for the rest)."""
    torch.manual_seed(0)
    unit = fusedres.FusedConvBNReLU(6, 8, backend=backend).to(dtype).train()
    if kind == "frozen":
        unit.bn = FrozenBatchNorm2d(8).to(dtype)
        unit.bn.eps = 0.0
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(unit.bn, name).uniform_(-0.5, 0.5)
        unit.bn.running_var.uniform_(0.5, 1.5)
    return unit


def _unit_step(unit, x, residual, checked=False, x_grad=True, autocast=False):
    """Forward + backward of a fixed output gradient; the checked path when ``checked``.
    The residual (or None) takes a gradient where it requires one."""
    if checked:
        unit_module._GRAD_PLANS.pop(unit.conv, None)
    x = x.detach().clone().requires_grad_(x_grad)
    if residual is not None:
        residual = residual.detach().clone().requires_grad_(residual.requires_grad)
    unit.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = unit(x, residual)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    if y.requires_grad:
        y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad, "dresidual": None if residual is None else residual.grad}
    out.update({f"grad {n}": p.grad for n, p in unit.named_parameters() if p.grad is not None})
    out.update({n: b.clone() for n, b in unit.named_buffers()})
    return out


def _unit_change(unit, what):
    """Changes one thing the unit plan's key holds, in the modules."""
    with torch.no_grad():
        if what == "momentum":
            unit.bn.momentum = 0.5
        elif what == "eps":
            unit.bn.eps = 0.25
        elif what == "eps_type":
            unit.bn.eps = 0  # equal to 0.0, but an int: no longer a FrozenBatchNorm2d
        elif what == "bn_eval":
            unit.bn.eval()
        elif what == "frozen_child":
            unit.bn.act = nn.Identity()  # a child: no longer a plain FrozenBatchNorm2d
        elif what == "frozen_parameter":
            unit.bn.scale = nn.Parameter(torch.ones(1, dtype=unit.bn.running_mean.dtype))
        elif what == "replaced_weight":
            unit.conv.weight = nn.Parameter(unit.conv.weight.detach() * -2.0)
        elif what == "weights_frozen":
            unit.requires_grad_(False)
        elif what == "hook":
            unit.conv.register_forward_hook(lambda m, args, out: None)
        elif what == "float32":
            unit.float()


_COMMON_UNIT_CHANGES = ["eps", "replaced_weight", "weights_frozen", "hook", "float32", "residual",
                        "batch_size", "autocast", "global_backend", "no_gradient_anywhere",
                        "x_no_grad", "residual_no_grad"]
#: (kind, change): nn.BatchNorm2d's own settings, and what makes a FrozenBatchNorm2d one.
UNIT_CHANGES = ([("batch_stats", w) for w in ["momentum", "bn_eval"] + _COMMON_UNIT_CHANGES]
                + [("frozen", w) for w in ["eps_type", "frozen_child", "frozen_parameter"]
                   + _COMMON_UNIT_CHANGES])


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("kind,what", UNIT_CHANGES)
def test_unit_plan_follows_what_its_key_holds(backend, kind, what, monkeypatch):
    dtype = torch.float32 if what == "autocast" else F64  # autocast leaves float64 alone
    planned = _unit(kind, backend, dtype)
    # Gradient flags: with the parameters frozen, x's or the residual's alone decides.
    if what in ("x_no_grad", "residual_no_grad"):
        planned.requires_grad_(False)
    checked = copy.deepcopy(planned)
    x = torch.randn(2, 6, 5, 5, dtype=dtype)
    residual = None
    if what == "residual_no_grad":
        residual = torch.randn(2, 8, 5, 5, dtype=dtype).requires_grad_()
    x_grad = what not in ("no_gradient_anywhere", "residual_no_grad")
    for _ in range(2):
        _assert_same(_unit_step(planned, x, residual, x_grad=x_grad),
                     _unit_step(checked, x, residual, checked=True, x_grad=x_grad))
    assert planned.conv in unit_module._GRAD_PLANS
    for unit in (planned, checked):
        _unit_change(unit, what)
    if what == "residual":
        residual = torch.randn(2, 8, 5, 5, dtype=dtype)
    elif what == "residual_no_grad":
        residual = residual.detach()
    elif what == "batch_size":
        x = torch.randn(3, 6, 5, 5, dtype=dtype)
    elif what == "float32":
        x = x.float()
    elif what == "global_backend":
        planned.backend = checked.backend = None
        fusedres.set_backend("eager")  # reset by conftest's autouse fixture
    elif what == "no_gradient_anywhere":
        planned.requires_grad_(False)
        checked.requires_grad_(False)
    x_grad = x_grad and what != "x_no_grad"
    # Which backend methods each call runs (none on the eager composition).
    be_type = type(fusedres.get_backend(backend))
    ops = {False: [], True: []}
    results = {False: [], True: []}
    for is_checked in (False, True):
        for method in ("unit_train", "unit_eval", "infer_runner"):
            monkeypatch.setattr(be_type, method,
                                _recorded(ops[is_checked], method, getattr(be_type, method)))
        unit = checked if is_checked else planned
        for _ in range(2):
            results[is_checked].append(_unit_step(unit, x, residual, checked=is_checked,
                                                  x_grad=x_grad, autocast=what == "autocast"))
        monkeypatch.undo()
    for got, expected in zip(results[False], results[True]):
        _assert_same(got, expected)
    assert ops[False] == ops[True]
    # What the change does, so that a plan that ignored it would have been caught.
    if kind == "frozen" and what in ("no_gradient_anywhere", "x_no_grad", "residual_no_grad"):
        assert ops[False][0] == "infer_runner"  # nothing to differentiate: the folded inference
    else:
        path = {"bn_eval": "unit_eval", "eps_type": None, "frozen_child": None,
                "frozen_parameter": None, "hook": None, "global_backend": None}.get(
                    what, "unit_train" if kind == "batch_stats" else "unit_eval")
        assert ops[False] == ([] if path is None else [path] * 2)
    if what == "autocast":
        assert results[False][0]["y"].dtype == torch.bfloat16


def _recorded(log, name, original):
    """A backend method that logs its name, then runs ``original``."""
    def method(self, *args, **kwargs):
        log.append(name)
        return original(self, *args, **kwargs)
    return method


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("what", ["residual_shape", "negative_eps", "wrong_channels"])
def test_refused_unit_call_after_a_plan_changes_no_state(backend, what):
    unit = _unit("batch_stats", backend, torch.float32)
    x = torch.randn(2, 6, 5, 5)
    for _ in range(2):
        _unit_step(unit, x, None)
    assert unit.conv in unit_module._GRAD_PLANS
    residual, message = None, "channels"
    if what == "residual_shape":
        residual, message = torch.randn(2, 8, 4, 5), "residual has shape"
    elif what == "negative_eps":
        unit.bn.eps, message = -1.0, "eps must be positive"
    else:
        x = torch.randn(2, 7, 5, 5)
    state = {k: v.clone() for k, v in unit.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=message):
        unit(x.requires_grad_(), residual)
    after = unit.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
