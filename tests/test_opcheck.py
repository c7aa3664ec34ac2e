"""torch.library.opcheck of the fusedres ops on CPU: schema, fake kernels (fusedres/ops/library.py)
against the real ones (shapes, dtypes, strides), and tracing through AOT dispatch."""

import os

import pytest
import torch

from fusedres import _ext, reference

if not _ext.extension_loaded():
    if os.environ.get("FUSEDRES_REQUIRE_EXTENSION") == "1":
        raise RuntimeError(f"FUSEDRES_REQUIRE_EXTENSION=1 but {_ext.EXTENSION_ERROR}")
    pytest.skip(f"C++ extension not built: {_ext.EXTENSION_ERROR}", allow_module_level=True)

import fusedres.ops.library  # noqa: E402  (registers the fake kernels)

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
# Registration of the CUDA implementations (csrc/fusedres.cpp). Runs without a GPU: the dispatcher
# table is inspected directly, and the CUDA kernel is entered with CPU tensors through
# redispatch, where the binding's device check must reject them before touching a pointer.


def _cuda_redispatch_args():
    """One CPU argument tuple per fusedres op, shaped as its schema wants."""
    z = _act(torch.float32, torch.channels_last)
    v = _vec(torch.float32)
    mask = torch.zeros((z.numel() + 7) // 8, dtype=torch.uint8)
    return {
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
    names = _fusedres_op_names()
    args = _cuda_redispatch_args()
    assert names == sorted(args), f"ops without a case here (update _cuda_redispatch_args): {names}"
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedres::{name}", "CUDA"), name
        with pytest.raises(RuntimeError, match=f"fusedres::{name}: the CUDA implementation got z on cpu"):
            getattr(ops, name).default.redispatch(cuda_only, *args[name])
