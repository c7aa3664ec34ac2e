"""torch.library.opcheck of the fusedres ops on CPU: schema, fake kernels (fusedres/ops/library.py,
fusedres/ops/unit_schema.py) against the real ones (shapes, dtypes, strides), the autograd
registered on the unit ops, and tracing through AOT dispatch."""

import os

import pytest
import torch

from fusedres import _ext, reference

if not _ext.extension_loaded():
    if os.environ.get("FUSEDRES_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"FUSEDRES_REQUIRE_EXTENSION=1 but {_ext.EXTENSION_ERROR}")
    pytest.skip(f"C++ extension not built: {_ext.EXTENSION_ERROR}", allow_module_level=True)

import fusedres.ops.library  # noqa: E402  (registers the fake kernels)
from fusedres.ops import unit_schema  # noqa: E402

ops = torch.ops.fusedres
SHAPE = (2, 6, 5, 7)


def _act(dtype, fmt):
    return torch.randn(SHAPE, dtype=dtype).contiguous(memory_format=fmt)


def _vec(dtype, lo=0.5, hi=1.5):
    c = SHAPE[1]
    return torch.rand(c, dtype=reference.stats_dtype(dtype)) * (hi - lo) + lo


PARAMS = pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last],
                                 ids=["contiguous", "channels_last"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)


def test_fake_kernels_registered():
    assert fusedres.ops.library.REGISTERED
    names = _fusedres_op_names()
    assert {"bn_act_fwd_mask", "bn_act_bwd_mask"} <= set(names), names
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedres::{name}", "Meta"), f"{name} has no fake"


@PARAMS
@DTYPES
def test_opcheck_bn_stats(dtype, fmt):
    torch.library.opcheck(ops.bn_stats, (_act(dtype, fmt),))


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@PARAMS
@DTYPES
def test_opcheck_bn_act_fwd(dtype, fmt, residual):
    z = _act(dtype, fmt)
    res = _act(dtype, fmt) if residual else None
    torch.library.opcheck(ops.bn_act_fwd, (z, _vec(dtype), _vec(dtype, -1, 1), res, True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@PARAMS
@DTYPES
def test_opcheck_bn_act_bwd(dtype, fmt, residual, training):
    z, dy = _act(dtype, fmt), _act(dtype, fmt)
    y = torch.relu(_act(dtype, fmt))
    args = (dy, y, z, _vec(dtype, -1, 1), _vec(dtype), _vec(dtype), True, residual, training)
    torch.library.opcheck(ops.bn_act_bwd, args)


@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@PARAMS
@DTYPES
def test_opcheck_bn_act_fwd_mask(dtype, fmt, residual):
    z = _act(dtype, fmt)
    res = _act(dtype, fmt) if residual else None
    torch.library.opcheck(ops.bn_act_fwd_mask, (z, _vec(dtype), _vec(dtype, -1, 1), res))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@PARAMS
@DTYPES
def test_opcheck_bn_act_bwd_mask(dtype, fmt, residual, training):
    z, dy = _act(dtype, fmt), _act(dtype, fmt)
    _, mask = ops.bn_act_fwd_mask(z, _vec(dtype), _vec(dtype, -1, 1), None)
    args = (dy, mask, z, _vec(dtype, -1, 1), _vec(dtype), _vec(dtype), residual, training)
    torch.library.opcheck(ops.bn_act_bwd_mask, args)


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@PARAMS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_max_pool2d(dtype, fmt, ceil_mode):
    x = _act(dtype, fmt)
    torch.library.opcheck(ops.max_pool2d, (x, [3, 2], [2, 1], [1, 0], [1, 2], ceil_mode))


def test_ops_compile_without_graph_breaks():
    """The composed forward traces whole under torch.compile (fullgraph) thanks to the fakes."""

    def unit(z, gamma, beta, res):
        mean, var = ops.bn_stats(z)
        scale = gamma * torch.rsqrt(var + 1e-5)
        return ops.bn_act_fwd(z, scale, beta - mean * scale, res, True)

    z, res = _act(torch.float32, torch.channels_last), _act(torch.float32, torch.channels_last)
    gamma, beta = _vec(torch.float32), _vec(torch.float32, -1, 1)
    compiled = torch.compile(unit, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, gamma, beta, res), unit(z, gamma, beta, res))


# ---------------------------------------------------------------------------------------------
# The unit ops: one per phase, autograd registered on the op, running statistics mutated in place.

UNIT_NAMESPACES = ["fusedres", "fusedres_test"]


def _unit_inputs(dtype, fmt, residual, affine, requires_grad):
    """A strided, grouped 3x3 unit: x [2, 4, 7, 6] -> y [2, 6, 4, 6]."""
    x = torch.randn(2, 4, 7, 6, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(6, 2, 3, 3, dtype=dtype)
    gamma = torch.rand(6, dtype=dtype) + 0.5 if affine else None
    beta = torch.randn(6, dtype=dtype) if affine else None
    res = torch.randn(2, 6, 4, 6, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    for t in (x, w, gamma, beta, res):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, gamma, beta, res


GEOMETRY = ([2, 1], [1, 1], [1, 1], 2)


@pytest.mark.parametrize("namespace", UNIT_NAMESPACES)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@PARAMS
@DTYPES
def test_opcheck_unit_train(namespace, dtype, fmt, residual, momentum):
    x, w, gamma, beta, res = _unit_inputs(dtype, fmt, residual, True, requires_grad=True)
    running = (torch.randn(6, dtype=dtype), torch.rand(6, dtype=dtype) + 0.5,
               torch.tensor(3, dtype=torch.long))
    op = getattr(torch.ops, namespace).unit_train.default
    torch.library.opcheck(op, (x, w, gamma, beta, res, *running, *GEOMETRY, True, momentum, 1e-5))


@pytest.mark.parametrize("namespace", UNIT_NAMESPACES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@PARAMS
@DTYPES
def test_opcheck_unit_eval(namespace, dtype, fmt, residual, affine):
    x, w, gamma, beta, res = _unit_inputs(dtype, fmt, residual, affine, requires_grad=True)
    running = (torch.randn(6, dtype=dtype), torch.rand(6, dtype=dtype) + 0.5)
    op = getattr(torch.ops, namespace).unit_eval.default
    torch.library.opcheck(op, (x, w, gamma, beta, res, *running, *GEOMETRY, True, 1e-5))


@pytest.mark.parametrize("namespace", UNIT_NAMESPACES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask", [(True, True, True, True, True), (False, True, False, True, False)],
                         ids=["all", "some"])
@PARAMS
def test_opcheck_unit_backward(namespace, fmt, training, mask):
    dtype = torch.float32
    x, w, gamma, beta, res = _unit_inputs(dtype, fmt, True, True, requires_grad=False)
    ns = getattr(torch.ops, namespace)
    y, z, mean, invstd = ns.unit_train(x, w, gamma, beta, res, None, None, None, *GEOMETRY, True,
                                       0.1, 1e-5)
    dy = torch.randn_like(y)
    # Eval keeps no z unless dgamma needs it (the op recomputes it).
    args = (dy, x, w, y, z if training else None, mean, invstd, gamma, *GEOMETRY, True, training,
            list(mask))
    torch.library.opcheck(ns.unit_backward.default, args)


def _block_backward_args(fmt, affine, recompute_conv1, needs):
    """A Bottleneck with a strided downsample, run through unit_train: the arguments its
    block_backward gets (x [2, 8, 6, 5] -> y [2, 16, 3, 3])."""
    x = torch.randn(2, 8, 6, 5).contiguous(memory_format=fmt)
    shapes = [(4, 8, 1, 1), (4, 4, 3, 3), (16, 4, 1, 1), (16, 8, 1, 1)]
    geometry = [((1, 1), (0, 0), (1, 1), 1), ((2, 2), (1, 1), (1, 1), 1),
                ((1, 1), (0, 0), (1, 1), 1), ((2, 2), (0, 0), (1, 1), 1)]
    relus = [True, True, True, False]
    weights = [torch.randn(s) * 0.3 for s in shapes]
    gammas = [torch.rand(s[0]) + 0.5 if affine else None for s in shapes]
    betas = [torch.randn(s[0]) if affine else None for s in shapes]
    ds = ops.unit_train(x, weights[3], gammas[3], betas[3], None, None, None, None,
                        *geometry[3], False, 0.1, 1e-5)
    h, zs, means, invstds = x, [], [], []
    for k in range(3):
        h, z, mean, invstd = ops.unit_train(h, weights[k], gammas[k], betas[k],
                                            ds[0] if k == 2 else None, None, None, None,
                                            *geometry[k], True, 0.1, 1e-5)
        zs.append(z)
        means.append(mean)
        invstds.append(invstd)
    if recompute_conv1:
        zs[0] = None
    flat = [v for g in geometry for v in (*g[0], *g[1], *g[2], g[3])]
    return (torch.randn_like(h), x, h, weights, gammas, betas, zs + [ds[1]], means + [ds[2]],
            invstds + [ds[3]], flat, relus, True, list(needs))


@pytest.mark.parametrize("needs", [[True] * 13, [False, True, False, False] + [False] * 9],
                         ids=["all", "conv1-weight-only"])
@pytest.mark.parametrize("recompute_conv1", [False, True], ids=["z1", "recompute-z1"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@PARAMS
def test_opcheck_block_backward(fmt, affine, recompute_conv1, needs):
    args = _block_backward_args(fmt, affine, recompute_conv1, needs)
    torch.library.opcheck(ops.block_backward.default, args)


def test_unit_schemas_agree():
    """The C++ ops and the Python backends' ops have one contract: the same schemas."""
    for name, schema in unit_schema.SCHEMAS.items():
        cpp = str(getattr(torch.ops.fusedres, name).default._schema)
        python = str(getattr(torch.ops.fusedres_test, name).default._schema)
        assert cpp.split("(", 1)[1] == python.split("(", 1)[1] == (name + schema).split("(", 1)[1]


@pytest.mark.parametrize("namespace", UNIT_NAMESPACES)
def test_unit_ops_compile_fullgraph_with_state_update(namespace):
    """A training step of a unit op traces whole (aot_eager) and updates the running statistics
    exactly as the uncompiled op does."""
    ns = getattr(torch.ops, namespace)

    def step(x, w, gamma, beta, rm, rv, nbt):
        y = ns.unit_train(x, w, gamma, beta, None, rm, rv, nbt, *GEOMETRY, True, None, 1e-5)[0]
        return y.square().sum()

    inputs = _unit_inputs(torch.float32, torch.channels_last, False, True, requires_grad=True)[:4]
    state = [torch.zeros(6), torch.ones(6), torch.tensor(0, dtype=torch.long)]
    state_c = [t.clone() for t in state]
    loss = step(*inputs, *state)
    grads = torch.autograd.grad(loss, inputs)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*inputs, *state_c)
    grads_c = torch.autograd.grad(loss_c, inputs)
    torch.testing.assert_close(loss_c, loss)
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g)
    for s_c, s in zip(state_c, state):
        torch.testing.assert_close(s_c, s)
    assert int(state_c[2]) == 1


# ---------------------------------------------------------------------------------------------
# Registration of the CUDA implementations (csrc/fusedres.cpp). Runs without a GPU: the dispatcher
# table is inspected directly, and the CUDA kernel is entered with CPU tensors through
# redispatch, where the binding's device check must reject them before touching a pointer.


def _cuda_redispatch_args():
    """One CPU argument tuple per fusedres op, shaped as its schema wants."""
    z = _act(torch.float32, torch.channels_last)
    v = _vec(torch.float32)
    mask = torch.zeros((z.numel() + 7) // 8, dtype=torch.uint8)
    x = torch.randn(2, 6, 5, 7)
    w = torch.randn(6, 6, 1, 1)
    geometry = ([1, 1], [0, 0], [1, 1], 1)
    return {
        "unit_train": (x, w, v, v, None, None, None, None, *geometry, True, 0.1, 1e-5),
        "unit_eval": (x, w, v, v, None, v, v, *geometry, True, 1e-5),
        "unit_backward": (z, x, w, z, z, v, v, v, *geometry, True, True, [True] * 5),
        "block_backward": (z, x, z, [w], [v], [v], [z], [v], [v], [1, 1, 0, 0, 1, 1, 1], [True],
                           False, [True] * 4),
        "bn_stats": (z,),
        "bn_act_fwd": (z, v, v, None, True),
        "bn_act_bwd": (z, z, z, v, v, v, True, True, True),
        "bn_act_fwd_mask": (z, v, v, None),
        "bn_act_bwd_mask": (z, mask, z, v, v, v, True, True),
    }


def _fusedres_op_names():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedres::"))


@pytest.mark.skipif(not _ext.cuda_kernels_built(), reason="fusedres._C was built without the CUDA kernels")
def test_every_op_has_a_cuda_kernel_that_rejects_cpu_tensors():
    # The inference max pool is a CPU kernel only (fusedres/ops/pool.py routes CPU tensors to it):
    # a CUDA tensor gets the dispatcher's error naming the op and the backend.
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fusedres::max_pool2d", "CUDA")
    names = [name for name in _fusedres_op_names() if name != "max_pool2d"]
    args = _cuda_redispatch_args()
    assert names == sorted(args), f"ops without a case here (update _cuda_redispatch_args): {names}"
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedres::{name}", "CUDA"), name
        arg = {"unit_train": "x", "unit_eval": "x", "unit_backward": "dy",
               "block_backward": "dy"}.get(name, "z")
        with pytest.raises(RuntimeError, match=f"fusedres::{name}: the CUDA implementation got {arg} on cpu"):
            getattr(ops, name).default.redispatch(cuda_only, *args[name])
