"""nn.BatchNorm2d semantics of the fused unit, checked with PyTorch's own BatchNorm2d test inputs.

Issue 13, point 9. ``torch.testing._internal.common_modules.module_db`` holds PyTorch's test
inputs for nn.BatchNorm2d (constructor arguments and forward inputs, plus error inputs). Each
case runs, as a new user would try it, through a fused unit whose convolution is the identity
(1x1, C -> C, weight = identity matrix, no bias), against the same identity convolution followed
by nn.BatchNorm2d (so the values are nn.BatchNorm2d's on the same input), in training and in
eval: outputs, gradients and running statistics. Then one test per defect that run found:

- ``nn.BatchNorm2d(C, bias=False)`` (module_db's ``affine_not_bias``) must work as in nn;
- ``eps <= 0`` must be refused like nn refuses it (ValueError naming eps at forward, see below),
  without touching any BN state, and never give NaN in eval;
- a running_mean / running_var (or gamma) of the wrong size: a clear error naming it, BN state
  untouched;
- after any failing training call every backend, eager included, leaves all BN state untouched
  (the README: "A call that fails leaves the running statistics untouched");
- double backward (gradient penalties) works and matches nn in float64.

What nn does with eps (torch 2.12 on, ``torch.nn.functional.batch_norm``; checked by
``test_nn_eps_contract`` so that a torch upgrade that changes it is noticed): construction accepts
any eps; the forward raises ``ValueError("batch_norm eps must be positive during training, but
got ...")`` whenever batch statistics are used (training, or eval without running statistics) and
eps <= 0, and ``ValueError("batch_norm eps must be non-negative, but got ...")`` in eval with eps
< 0; eval with eps == 0 and running statistics works. torch 2.11 raises ``ValueError("batch_norm
eps must be positive, but got ...")`` for every eps <= 0, eval with running statistics too; the
fused modules ask the installed torch which rule it has. nn raises *after* its module has added 1
to num_batches_tracked (``_BatchNorm.forward`` counts the batch before calling
``F.batch_norm``), so the stricter "untouched" rule here is fusedres' own promise, not nn's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fusedres
from fusedres.ops.unit import NN_TAKES_ZERO_EPS_WITH_RUNNING_STATS
from conftest import CPU_FUSED_BACKENDS, assert_oracle_close


def _import_module_db():
    """module_db's nn.BatchNorm2d entry, or the reason it cannot be imported.

    Importing torch.testing._internal.common_utils calls torch.backends.disable_global_flags(),
    after which plain assignments such as ``torch.backends.cudnn.allow_tf32 = False`` raise for
    the rest of the process. torch.backends' own context manager restores the previous state
    on exit, so other tests in the same run are unaffected. (It also wraps TorchScript
    functions' ``__call__`` in a profiler record, which only adds a label.)
    """
    try:
        with warnings.catch_warnings(), torch.backends.__allow_nonbracketed_mutation():
            warnings.simplefilter("ignore")
            from torch.testing._internal.common_modules import module_db
    except ImportError as e:   # expecttest (a [test] extra) is what it usually lacks
        return None, f"torch.testing._internal.common_modules is not importable: {e}"
    entries = [info for info in module_db if info.module_cls is nn.BatchNorm2d]
    if len(entries) != 1:
        return None, f"module_db has {len(entries)} nn.BatchNorm2d entries, expected 1"
    return entries[0], None


BN_INFO, BN_INFO_ERROR = _import_module_db()
needs_module_db = pytest.mark.skipif(BN_INFO is None, reason=str(BN_INFO_ERROR))


def _module_inputs(training: bool, dtype: torch.dtype = torch.float32) -> list:
    return BN_INFO.module_inputs_func(BN_INFO, device="cpu", dtype=dtype, requires_grad=True,
                                      training=training)


def _case_ids() -> list:
    """The module_db descriptions (the first, default case has none)."""
    if BN_INFO is None:
        return ["module_db-unavailable"]
    return [mi.desc or "default" for mi in _module_inputs(True)]


def _backend_param(name):
    """A backend for the failure tests: eager and the CPU fused ones, triton if it runs here."""
    ok, why = fusedres.available_backends()[name]
    if name == "triton":
        from fusedres.backend import get_backend
        if ok and "cpu" not in get_backend("triton").device_types:
            ok, why = False, "triton runs on CUDA tensors only here (no TRITON_INTERPRET=1)"
    return pytest.param(name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {why}"))


#: The fused backends that take CPU tensors here: conftest's, and triton under its interpreter
#: (for the defect tests, at tiny shapes; module_db's loop stays on conftest's list).
FUSED_BACKENDS = [*CPU_FUSED_BACKENDS, _backend_param("triton")]
#: ... and eager: the README's promise about failing calls holds for every backend.
ALL_CPU_BACKENDS = ["eager", *FUSED_BACKENDS]
#: The float dtypes each fused backend takes on CPU tensors (triton has no float64 kernels).
BACKEND_DTYPES = {"torch_ops": (torch.float32, torch.float64), "cpu": (torch.float32, torch.float64),
                  "triton": (torch.float32,)}


def backend_dtype_params(dtypes=(torch.float32, torch.float64)) -> list:
    """(backend, dtype) pairs over FUSED_BACKENDS, each dtype where the backend takes it."""
    out = []
    for param in FUSED_BACKENDS:
        name = param.values[0] if hasattr(param, "values") else param
        marks = param.marks if hasattr(param, "marks") else ()
        for dtype in dtypes:
            if dtype in BACKEND_DTYPES[name]:
                out.append(pytest.param(name, dtype, marks=marks, id=f"{name}-{str(dtype)[6:]}"))
    return out


def identity_conv(channels: int, dtype: torch.dtype) -> nn.Conv2d:
    """A 1x1 C -> C convolution whose weight is the identity matrix: conv(x) == x exactly."""
    conv = nn.Conv2d(channels, channels, 1, bias=False, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels, dtype=dtype).view(channels, channels, 1, 1))
    return conv


def randomize_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    """Non-trivial gamma, beta and running statistics (nn's defaults 1, 0, 0, 1 hide terms)."""
    with torch.no_grad():
        for name, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5),
                             ("running_mean", -0.3, 0.3), ("running_var", 0.5, 2.0)):
            t = getattr(bn, name)
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(2)


def bn_state(bn: nn.Module) -> dict:
    """Copies of every parameter and buffer of ``bn`` (running statistics, num_batches_tracked)."""
    return {k: v.detach().clone() for k, v in bn.state_dict().items()}


def assert_state_untouched(bn: nn.Module, before: dict, what: str) -> None:
    after = bn_state(bn)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{what}: BatchNorm {k} changed by a failing call " \
                                         f"({v.tolist()} -> {after[k].tolist()})"


def run_fused(x, conv, bn, residual, dy, backend, relu):
    """Forward + backward of ``fusedres.conv_bn_act``; outputs, gradients and BN state by name."""
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    y = fusedres.conv_bn_act(x, conv, bn, residual, relu=relu, backend=backend)
    return _collect(y, x, conv, bn, residual, dy)


def run_nn(x, conv, bn, residual, dy, relu):
    """The same through plain nn modules (the oracle composition)."""
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return _collect(y, x, conv, bn, residual, dy)


def _collect(y, x, conv, bn, residual, dy):
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad, "dW": conv.weight.grad}
    if residual is not None:
        out["dresidual"] = residual.grad
    for name in ("weight", "bias"):
        p = getattr(bn, name)
        if p is not None:
            out["d" + name] = p.grad
    for name, b in bn.named_buffers():
        out[name] = b.clone()
    return out


def compare_with_nn(backend, conv, bn, x, residual=None, relu=False, training=True):
    """Fused (x's dtype) vs nn in x's dtype vs nn in float64, with docs/design.md's rule.

    ``conv`` and ``bn`` are left unused: each run gets its own deep copy.
    """
    dtype = x.dtype
    out_shape = conv(x.detach()).shape
    dy = torch.randn(out_shape, dtype=torch.float64)
    copies = [(copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).to(dtype).train(training))
              for _ in range(2)]
    conv64, bn64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double().train(training)
    cast = (lambda t: None if t is None else t.detach().to(dtype))
    got = run_fused(cast(x), *copies[0], cast(residual), cast(dy), backend, relu)
    ref = run_nn(cast(x), *copies[1], cast(residual), cast(dy), relu)
    exact = run_nn(x.detach().double(), conv64, bn64,
                   None if residual is None else residual.detach().double(), dy, relu)
    assert got.keys() == exact.keys(), f"{sorted(got)} != nn's {sorted(exact)}"
    for key, want in exact.items():
        if key == "num_batches_tracked":
            assert torch.equal(got[key], want), f"num_batches_tracked {got[key]} != nn's {want}"
            continue
        assert got[key] is not None, f"{key} was not computed (nn computes it)"
        assert_oracle_close(got[key], ref[key], want, name=key)


# -- module_db's nn.BatchNorm2d inputs ------------------------------------------------------------

@needs_module_db
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", _case_ids())
def test_module_db_inputs_through_identity_conv(backend, dtype, training, case):
    """Every module_db nn.BatchNorm2d case: fused identity-conv unit == nn.BatchNorm2d."""
    inputs = {mi.desc or "default": mi for mi in _module_inputs(training, dtype)}
    mi = inputs[case]
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(*mi.constructor_input.args, **mi.constructor_input.kwargs, dtype=dtype)
    randomize_bn(bn, torch.Generator().manual_seed(1))
    (x,) = mi.forward_input.args
    assert not mi.forward_input.kwargs
    compare_with_nn(backend, identity_conv(bn.num_features, dtype), bn, x, training=training)


@needs_module_db
def test_module_db_error_inputs_are_nns_errors():
    """The error inputs module_db lists really are nn's forward errors in training mode (a
    module's mode right after construction), so the fused tests below hold the fused unit to a
    contract PyTorch itself states."""
    from torch.testing._internal.common_modules import ModuleErrorEnum
    errors = BN_INFO.module_error_inputs_func(BN_INFO, device="cpu", dtype=torch.float32,
                                              requires_grad=False, training=True)
    assert errors, "module_db lists no nn.BatchNorm2d error inputs"
    for err in errors:
        mi = err.module_error_input
        assert err.error_on == ModuleErrorEnum.FORWARD_ERROR
        bn = nn.BatchNorm2d(*mi.constructor_input.args, **mi.constructor_input.kwargs).train()
        with pytest.raises(err.error_type, match=err.error_regex):
            bn(*mi.forward_input.args)


def _error_case_ids() -> list:
    if BN_INFO is None:
        return ["module_db-unavailable"]
    errors = BN_INFO.module_error_inputs_func(BN_INFO, device="cpu", dtype=torch.float32,
                                              requires_grad=False, training=True)
    return [f"eps={e.module_error_input.constructor_input.kwargs.get('eps')}" for e in errors]


@needs_module_db
@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("index", range(len(_error_case_ids())), ids=_error_case_ids())
def test_module_db_error_inputs(backend, training, index):
    """module_db's error inputs (eps <= 0) through the fused identity-conv unit: where nn
    raises, the fused unit raises nn's error type naming eps and leaves BN state untouched;
    where nn computes (eval, eps=0), it computes the same, finite, values."""
    err = BN_INFO.module_error_inputs_func(BN_INFO, device="cpu", dtype=torch.float32,
                                           requires_grad=False, training=True)[index]
    mi = err.module_error_input
    bn = nn.BatchNorm2d(*mi.constructor_input.args, **mi.constructor_input.kwargs).train(training)
    randomize_bn(bn, torch.Generator().manual_seed(2))
    (x,) = mi.forward_input.args
    expect_nn_outcome(backend, identity_conv(bn.num_features, x.dtype), bn, x)


def expect_nn_outcome(backend, conv, bn, x):
    """Runs nn (on a copy) and the fused unit on ``x``: same error type, or the same values.

    On an error the fused unit must name ``eps`` and leave every BN tensor untouched (nn itself
    counts the batch first: see the module docstring).
    """
    nn_bn = copy.deepcopy(bn)
    try:
        expected = nn_bn(conv(x)).detach()
        nn_error = None
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        nn_error = e
    before = bn_state(bn)
    if nn_error is not None:
        # The grad mode is the caller's: with x requiring grad the unit takes its autograd path.
        with pytest.raises(type(nn_error), match=r"eps") as info:
            fusedres.conv_bn_act(x, conv, bn, relu=False, backend=backend)
        assert_state_untouched(bn, before, f"{type(info.value).__name__}: {info.value}")
    else:
        y = fusedres.conv_bn_act(x, conv, bn, relu=False, backend=backend).detach()
        assert torch.isfinite(y).all(), \
            f"non-finite output where nn's is finite: {torch.isfinite(expected).all().item()}"
        torch.testing.assert_close(y, expected)
        for k, v in bn_state(nn_bn).items():
            assert torch.equal(bn_state(bn)[k], v), f"{k} differs from nn's"


# -- the defects, one test each -------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", backend_dtype_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_affine_without_bias_like_nn(backend, dtype, training):
    """nn.BatchNorm2d(C, bias=False): a learnable gamma and no beta. A real unit (3x3 conv,
    residual, ReLU) must match nn: output, dx, dW, dgamma, dresidual and the statistics. torch
    2.11's BatchNorm2d takes no ``bias`` argument; there the same module is made by hand, with
    its bias parameter set to None (what ``bias=False`` registers)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 6, 3, padding=1, bias=False, dtype=dtype)
    try:
        bn = nn.BatchNorm2d(6, bias=False, dtype=dtype)
    except TypeError:
        bn = nn.BatchNorm2d(6, dtype=dtype)
        bn.bias = None
    assert bn.affine and bn.bias is None
    randomize_bn(bn, torch.Generator().manual_seed(4))
    x = torch.randn(3, 5, 7, 6, dtype=dtype)
    residual = torch.randn(3, 6, 7, 6, dtype=dtype)
    compare_with_nn(backend, conv, bn, x, residual, relu=True, training=training)


def test_nn_eps_contract():
    """What nn.BatchNorm2d does with eps <= 0 in torch as installed (the module docstring): the
    eps tests below take nn's behaviour as their expectation, this pins it down. Batch
    statistics need eps > 0 in every supported torch; running statistics take eps = 0 from
    torch 2.12 on, where torch 2.11 refused every eps <= 0 (what
    ``NN_TAKES_ZERO_EPS_WITH_RUNNING_STATS`` says, and the fused modules follow)."""
    x = torch.randn(2, 3, 4, 4)
    zero_eps_with_running_stats = NN_TAKES_ZERO_EPS_WITH_RUNNING_STATS
    training_words = " during training" if zero_eps_with_running_stats else ", but got"
    for eps in (0.0, -1.0):
        bn = nn.BatchNorm2d(3, eps=eps)              # construction accepts any eps
        with pytest.raises(ValueError, match=rf"eps must be positive{training_words}"):
            bn.train()(x)
        assert int(bn.num_batches_tracked) == 1      # nn counted the failing batch
        with pytest.raises(ValueError, match=rf"eps must be positive{training_words}"):
            nn.BatchNorm2d(3, eps=eps, track_running_stats=False).eval()(x)
    running_words = "non-negative" if zero_eps_with_running_stats else "positive, but got"
    with pytest.raises(ValueError, match=rf"eps must be {running_words}"):
        nn.BatchNorm2d(3, eps=-1.0).eval()(x)
    if zero_eps_with_running_stats:
        assert torch.isfinite(nn.BatchNorm2d(3, eps=0.0).eval()(x)).all()
    else:
        with pytest.raises(ValueError, match=r"eps must be positive, but got 0.0"):
            nn.BatchNorm2d(3, eps=0.0).eval()(x)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, -1.0])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_running_stats"])
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
def test_nonpositive_eps(backend, eps, mode, with_grad):
    """eps <= 0 on a real unit: nn's ValueError (naming eps) wherever nn raises, with every BN
    tensor untouched; nn's finite values where nn computes (eval with running statistics and
    eps = 0). Never NaN."""
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(6, eps=eps, track_running_stats=(mode != "eval_no_running_stats"))
    bn.train(mode == "train")
    randomize_bn(bn, torch.Generator().manual_seed(6))
    x = torch.randn(2, 4, 5, 5, requires_grad=with_grad)
    expect_nn_outcome(backend, conv, bn, x)


def _wrong_size(bn: nn.BatchNorm2d, name: str) -> None:
    """Replaces ``bn.<name>`` by a tensor with one element too many (a buffer or parameter)."""
    old = getattr(bn, name)
    new = torch.rand(old.numel() + 1, dtype=old.dtype) + 0.5
    setattr(bn, name, nn.Parameter(new) if isinstance(old, nn.Parameter) else new)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_size_bn_tensor(backend, name, training):
    """A BN tensor of the wrong size (nn: RuntimeError "<name> should contain 6 elements not 7"):
    a clear error naming it, and running_mean, running_var and num_batches_tracked untouched."""
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(6).train(training)
    randomize_bn(bn, torch.Generator().manual_seed(8))
    _wrong_size(bn, name)
    before = bn_state(bn)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with pytest.raises((RuntimeError, ValueError), match=name):
        fusedres.conv_bn_act(x, conv, bn, relu=True, backend=backend)
    assert_state_untouched(bn, before, f"{name} of the wrong size")


def _failing_call(kind: str):
    """(conv, bn, x, residual) whose training call must fail, one per way a call can fail."""
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(6, momentum=None)
    randomize_bn(bn, torch.Generator().manual_seed(10))
    x, residual = torch.randn(2, 4, 5, 5), None
    if kind == "eps_zero":
        bn.eps = 0.0
    elif kind == "eps_negative":
        bn.eps = -1.0
    elif kind in ("running_mean_size", "running_var_size", "weight_size"):
        _wrong_size(bn, kind[:-len("_size")])
    elif kind == "one_value_per_channel":
        x = torch.randn(1, 4, 1, 1)
    elif kind == "residual_shape":
        residual = torch.randn(2, 6, 4, 4)
    elif kind == "input_channels":
        x = torch.randn(2, 3, 5, 5)
    else:
        raise AssertionError(kind)
    return conv, bn.train(), x, residual


FAILURES = ["eps_zero", "eps_negative", "running_mean_size", "running_var_size", "weight_size",
            "one_value_per_channel", "residual_shape", "input_channels"]


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
@pytest.mark.parametrize("kind", FAILURES)
@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
def test_failing_training_call_leaves_bn_state_untouched(backend, kind, with_grad):
    """Any failing training call, on every backend (eager too: the README promises it), leaves
    gamma, beta, running_mean, running_var and num_batches_tracked as they were."""
    conv, bn, x, residual = _failing_call(kind)
    x.requires_grad_(with_grad)
    before = bn_state(bn)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        fusedres.conv_bn_act(x, conv, bn, residual, relu=True, backend=backend)
    assert_state_untouched(bn, before, f"{kind} on {backend}")


@pytest.mark.parametrize("backend,dtype", backend_dtype_params((torch.float64,)) + [
    p for p in backend_dtype_params((torch.float32,)) if p.values[0] == "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_double_backward_matches_nn(backend, dtype, training, has_residual, relu):
    """Second derivatives (a gradient penalty: grad with create_graph=True, then grad of a
    function of those gradients) of x, conv weight, gamma, beta and the residual, against nn's.

    float64 where the backend takes it (then the rule is near-exact agreement with nn), else
    float32 with the 2x rule against nn in float32 and float64. A derivative nn computes must
    come back as a tensor with nn's values, never as a silent None.
    """
    torch.manual_seed(11)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False, dtype=torch.float64)
    bn = nn.BatchNorm2d(6, dtype=torch.float64).train(training)
    randomize_bn(bn, torch.Generator().manual_seed(12))
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    out_shape = (3, 6, 4, 3)
    residual = torch.randn(out_shape, dtype=torch.float64) if has_residual else None
    dy = torch.randn(out_shape, dtype=torch.float64)
    # A weighted square of every first derivative: non-linear in them, as penalties are.
    weights = [torch.randn(shape, dtype=torch.float64) for shape in
               [x.shape, conv.weight.shape, (6,), (6,)] + ([out_shape] if has_residual else [])]

    def derivatives(fused: bool, dt: torch.dtype):
        """(first derivatives, second derivatives, bn) of the unit in ``dt``."""
        c, b = copy.deepcopy(conv).to(dt), copy.deepcopy(bn).to(dt)
        xx = x.to(dt).requires_grad_()
        rr = None if residual is None else residual.to(dt).requires_grad_()
        inputs = [xx, c.weight, b.weight, b.bias] + ([rr] if rr is not None else [])
        if fused:
            y = fusedres.conv_bn_act(xx, c, b, rr, relu=relu, backend=backend)
        else:
            y = b(c(xx))
            if rr is not None:
                y = y + rr
            if relu:
                y = torch.relu(y)
        first = torch.autograd.grad((y * dy.to(dt)).sum(), inputs, create_graph=True)
        penalty = sum((g * g * v.to(dt)).sum() for g, v in zip(first, weights))
        second = torch.autograd.grad(penalty, inputs, allow_unused=True)
        return first, second, b

    names = ["x", "conv.weight", "bn.weight", "bn.bias"] + (["residual"] if has_residual else [])
    first_64, second_64, bn_64 = derivatives(False, torch.float64)
    first_nn, second_nn, bn_nn = derivatives(False, dtype)
    first_f, second_f, bn_f = derivatives(True, dtype)
    assert any(s is not None and s.abs().max() > 1e-3 for s in second_64), \
        "nn's second derivatives all vanish here: the test could not fail"
    for name, g_f, g_nn, g_64 in zip(names, first_f, first_nn, first_64):
        assert_oracle_close(g_f, g_nn, g_64, name=f"first derivative of {name}")
    for name, s_f, s_nn, s_64 in zip(names, second_f, second_nn, second_64):
        if s_64 is None:   # nn's graph does not reach it: the fused one may return None or zeros
            assert s_f is None or not s_f.any(), f"second derivative of {name}: nn has none"
            continue
        assert s_f is not None, (f"second derivative of {name} is None where nn's is "
                                 f"{s_64.abs().max().item():.3g} at most")
        assert_oracle_close(s_f, s_nn, s_64, name=f"second derivative of {name}")
    for k, v in bn_state(bn_64).items():
        got = bn_state(bn_f)[k]
        if k == "num_batches_tracked":
            assert torch.equal(got, v), f"num_batches_tracked {got} != nn's {v}"
        else:
            assert_oracle_close(got, bn_state(bn_nn)[k], v, name=k)
