"""The ``triton`` backend: fused convolution + BatchNorm kernels written in Triton.

Runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` is set (tests only: the
interpreter is slow). A unit's phase is one op call, ``torch.ops.fusedres_triton.unit_*``, with
the C++ unit ops' schemas and autograd registered on the op (fusedres/ops/python_unit.py); inside,
the launchers run behind their own torch.library ops (fusedres/ops/triton_library.py). Triton and
the kernels (fusedres.kernels) are imported on first use, so ``import fusedres`` works, and stays
light, without triton.

Fusion points (docs/design.md section 2):

- training forward: the convolution's epilogue writes per-tile BN statistics (F1); a finalize
  merges them and computes invstd/scale/shift; one pass applies scale/shift + residual + ReLU (F2).
- eval forward: one convolution whose epilogue applies scale/shift + residual + ReLU (F2); z is
  never written. Inference uses the folded weights (fusedres.ops.fold) with the bias as shift.
- backward: ReLU mask, dresidual, dbeta and dgamma in one pass, dz in a second (B1).

Routing decision for the convolution backward: dgrad and wgrad go to ATen
(``torch.ops.aten.convolution_backward``: cuDNN on a GPU). B2 (computing dz while loading the
dgrad/wgrad operands) would save one write and two reads of dz, but dz needs dbeta/dgamma, i.e. a
full reduction over dy, y and z first, so the reduction pass stays and the saving is at most 3 of
the ~8 tensor passes of a unit's backward, while a hand-written dgrad/wgrad must first match
cuDNN's tuned kernels (wgrad is a reduction over N*H*W, split-K territory) before that saving
shows. Until a GPU measurement says otherwise, cuDNN wins.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fusedres.backend import (Backend, BlockOps, ConvParams, in_memory_format_of,
                              register_backend)
from fusedres.ops import fold, python_unit, unit_schema
from fusedres.ops import triton_library as _ops


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_AVAILABILITY: dict[bool, tuple[bool, str]] = {}


def _find_triton(interpreting: bool) -> tuple[bool, str]:
    # Looks triton up without importing it: importing it here would fix the interpreter mode for
    # the whole process before tests get to set TRITON_INTERPRET.
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed; pip install 'triton>=3.6,<3.10'"
    version = importlib.metadata.version("triton")
    if interpreting:
        return True, f"triton {version} (TRITON_INTERPRET=1: CPU interpreter)"
    if not torch.cuda.is_available():
        return False, (f"triton {version} is installed but torch sees no CUDA device "
                       "(set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")
    return True, f"triton {version}"


def _gamma_beta(gamma, beta, channels: int, like: torch.Tensor):
    """gamma, beta [C] float32 for the kernels (ones and zeros without affine)."""
    g = gamma.float() if gamma is not None else like.new_ones((channels,), dtype=torch.float32)
    b = beta.float() if beta is not None else like.new_zeros((channels,), dtype=torch.float32)
    return g, b


def _launcher_ops(t: torch.Tensor):
    """Where the block op (fusedres/ops/block.py) calls the launchers for a call on ``t``: the
    registered ops (``triton_library``) where something may trace or transform the call
    (torch.compile, a fake or functional tensor, a dispatch mode: they must see the op; the
    batched dy of ``torch.autograd.grad(..., is_grads_batched=True)``: vmap's fallback runs the
    op slice by slice), else their implementations directly, without the 8-35 us of dispatch
    each. torch.func's transforms and torch.jit.trace never reach a fused unit
    (``fusability.eager_only_reason``)."""
    if (torch.compiler.is_compiling() or type(t) is not torch.Tensor
            or torch._C._functorch.is_legacy_batchedtensor(t)
            or _get_current_dispatch_mode() is not None):
        return _ops
    return _ops.direct


# _train, _eval and _backward implement the unit ops (_UNIT_OPS): they run only as an op's
# implementation, on real tensors that nothing traces (a trace sees the unit op and its fake
# kernel), so they call the launcher ops' implementations directly (triton_library.direct).


def _train(x, weight, gamma, beta, residual, running_mean, running_var, num_batches_tracked,
           stride, padding, dilation, groups, relu, momentum, eps):
    g, b = _gamma_beta(gamma, beta, weight.shape[0], x)
    # The statistics' finalize also updates the running statistics (one fixed-config launch).
    z, stats = _ops.direct.conv2d_bn_train(x, weight, list(stride), list(padding),
                                           list(dilation), groups, g, b, eps, running_mean,
                                           running_var, num_batches_tracked, momentum)
    python_unit.bump_versions(running_mean, running_var, num_batches_tracked)
    mean, _, invstd, scale, shift = stats.unbind(0)
    y = _ops.direct.bn_act_fwd(z, scale, shift, residual, relu)
    # z stays channels_last (the layout the backward's kernels and cuDNN like best); y takes x's
    # memory format, as ATen's convolution would give it. mean and invstd are rows of one
    # tensor: op outputs may not alias, so they leave as copies ([C] each).
    return in_memory_format_of(y, x), z, mean.clone(), invstd.clone()


def _eval(x, weight, gamma, beta, residual, running_mean, running_var, stride, padding, dilation,
          groups, relu, eps):
    scale, shift = python_unit.eval_coefficients(gamma, beta, running_mean, running_var, eps,
                                                 x.dtype)
    y = _ops.direct.conv2d(x, weight, list(stride), list(padding), list(dilation), groups, scale,
                           shift, residual, relu)
    return in_memory_format_of(y, x)


def _backward(dy, x, weight, y, z, mean, invstd, gamma, stride, padding, dilation, groups, relu,
              training, output_mask):
    need_dx, need_dw, need_dgamma, need_dbeta, need_dres = output_mask
    need_affine = need_dgamma or need_dbeta
    if z is None and (training or need_dgamma):
        # The eval forward did not write z; dgamma needs it. Recomputing costs one convolution,
        # only in the rare "frozen statistics, trainable gamma" case.
        z = _ops.direct.conv2d(x, weight, list(stride), list(padding), list(dilation), groups,
                               None, None, None, False)
    g, _ = _gamma_beta(gamma, None, weight.shape[0], dy)
    # Without ReLU the kernels never read y (the unit does not keep it): dy stands in.
    dz, sums, dres = _ops.direct.bn_act_bwd(dy, y if relu else dy, z, mean, invstd, g, relu,
                                            need_dres, training, need_affine)
    dx, dw = python_unit.conv_backward(dz, x.contiguous(memory_format=torch.channels_last),
                                       weight, stride, padding, dilation, groups, need_dx,
                                       need_dw)
    dbias, dgamma = sums.unbind(0) if need_affine else (None, None)
    # dgamma and dbias are rows of one tensor, copied apart; a [0] placeholder per output not
    # asked for: op outputs may not alias one another.
    outputs = (dx, dw, dgamma.clone() if need_dgamma else None,
               dbias.clone() if need_dbeta else None, dres)
    return tuple(t if need else dy.new_empty((0,)) for t, need in zip(outputs, output_mask))


def _train_from_z(z_prev, scale_prev, shift_prev, weight, gamma, beta, residual, running_mean,
                  running_var, num_batches_tracked, stride, padding, dilation, groups, relu,
                  momentum, eps, write_y):
    """A unit's training forward whose convolution reads z_prev through the previous unit's
    BatchNorm + ReLU (F3, ``scale_prev``/``shift_prev``; None: z_prev is a plain input), for
    the block-level op (:class:`fusedres.backend.BlockOps`). y is written only with
    ``write_y`` (a [0] placeholder otherwise), channels_last; scale and shift are the ones the
    statistics' finalize computed."""
    g, b = _gamma_beta(gamma, beta, weight.shape[0], z_prev)
    ops = _launcher_ops(z_prev)
    z, stats = ops.conv2d_bn_train(z_prev, weight, list(stride), list(padding), list(dilation),
                                   groups, g, b, eps, running_mean, running_var,
                                   num_batches_tracked, momentum, scale_prev, shift_prev)
    if not torch.compiler.is_compiling():
        # Called from the block op's forward, not below an op (where unit_train bumps them).
        # A compiled graph writes the mutated buffers back with copy_, which counts itself.
        python_unit.bump_versions(running_mean, running_var, num_batches_tracked)
    mean, _, invstd, scale, shift = stats.unbind(0)
    if write_y:
        # The block's last unit: nothing loads its coefficients, so the block op keeps only its
        # mean and invstd, copied apart from the [5, C] rows.
        y = ops.bn_act_fwd(z, scale, shift, residual, relu)
        return y, z, mean.clone(), invstd.clone(), scale, shift
    # Rows of the finalize's one [5, C] tensor, as they are (this is no op, whose outputs may not
    # alias): the block op keeps four of them, and each copy would be one more launch on a path
    # the H200 showed host-bound.
    return z.new_empty((0,)), z, mean, invstd, scale, shift


def _convolution(x, weight, stride, padding, dilation, groups):
    """The training forward's convolution (its kernel, no epilogue): z channels_last."""
    return _launcher_ops(x).conv2d(x, weight, list(stride), list(padding), list(dilation), groups,
                                   None, None, None, False)


def _unit_backward(dy, x, weight, y, z, mean, invstd, gamma, stride, padding, dilation, groups,
                   relu, training, output_mask):
    """The unit backward for the block op's loop (``fusedres.ops.block.backward_units``): the
    registered op where something may trace the call, else its implementation directly (see
    :func:`_launcher_ops`); the same outputs, [0] placeholders included."""
    impl = _UNIT_OPS.backward if _launcher_ops(dy) is _ops else _backward
    return impl(dy, x, weight, y, z, mean, invstd, gamma, stride, padding, dilation, groups,
                relu, training, output_mask)


def _bn_act_fwd(z, scale, shift, residual, relu):
    """``act(z*scale + shift + residual)`` for the block op (its backward's rebuild of y)."""
    return _launcher_ops(z).bn_act_fwd(z, scale, shift, residual, relu)


_UNIT_OPS = python_unit.define_unit_ops(
    "fusedres_triton", python_unit.PhaseImpls(_train, _eval, _backward),
    unit_schema.CHANNELS_LAST_LAYOUT)


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    @property
    def device_types(self) -> tuple:
        # Read at call time: tests set TRITON_INTERPRET after fusedres has been imported.
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    def availability(self) -> tuple[bool, str]:
        # Every unit resolves its backend, and looking a package's version up costs ~0.3 ms:
        # cached, keyed on what tests may change at run time. A plain dict rather than
        # functools.lru_cache, which torch.compile traces through (and warns about).
        interpreting = _interpreting()
        if interpreting not in _AVAILABILITY:
            _AVAILABILITY[interpreting] = _find_triton(interpreting)
        return _AVAILABILITY[interpreting]

    def unit_train(self, x, weight, gamma, beta, residual, running_mean, running_var,
                   num_batches_tracked, conv: ConvParams, relu, momentum, eps):
        return _UNIT_OPS.train(x, weight, gamma, beta, residual, running_mean, running_var,
                               num_batches_tracked, conv.stride, conv.padding, conv.dilation,
                               conv.groups, relu, momentum, eps)[0]

    def unit_eval(self, x, weight, gamma, beta, residual, running_mean, running_var,
                  conv: ConvParams, relu, eps):
        return _UNIT_OPS.eval(x, weight, gamma, beta, residual, running_mean, running_var,
                              conv.stride, conv.padding, conv.dilation, conv.groups, relu, eps)

    def block_ops(self) -> BlockOps:
        # F3: a block's training forward writes no y but the block output.
        return BlockOps(_UNIT_OPS.train, _unit_backward, _bn_act_fwd, _convolution,
                        _train_from_z)

    def unit_infer(self, conv_module, x, weight, gamma, beta, residual, running_mean,
                   running_var, conv: ConvParams, relu, eps):
        return self.infer_runner(conv_module, x, weight, gamma, beta, residual, running_mean,
                                 running_var, conv, relu, eps)(x, residual, False)

    def infer_runner(self, conv_module, x, weight, gamma, beta, residual, running_mean,
                     running_var, conv: ConvParams, relu, eps):
        # One convolution whose epilogue adds the folded bias (the affine step with scale 1),
        # the residual and the ReLU (F2). Folded, laid out and decided once per plan: a call is
        # an allocation and a launch, where every call had looked the fold up, filled the scale
        # with ones and checked and decided the launch again (a unit's eval forward took 147 us
        # of host time, now 66, launches stubbed: benchmarks/triton_host_proxy.py; the H200
        # showed the triton eval host-bound).
        from fusedres.kernels import conv as conv_k  # imports triton: on first use only
        folded = fold.fold_conv_bn(conv_module, weight, gamma, beta, running_mean, running_var,
                                   eps, x.dtype, "triton", fold.FoldedConv)
        launch = conv_k.conv2d_runner(x, folded.weight, *fold.geometry_lists(conv),
                                      scale=torch.ones_like(folded.bias), shift=folded.bias,
                                      has_residual=residual is not None, relu=relu)

        def run(x, residual, residual_is_dead):
            out = None
            if residual is not None:
                if residual_is_dead and residual.is_contiguous(memory_format=torch.channels_last):
                    out = residual  # see conv2d_runner: y may take the dead residual's memory
                residual = residual.contiguous(memory_format=torch.channels_last)
            y = launch(x.contiguous(memory_format=torch.channels_last), residual, out)
            return in_memory_format_of(y, x)
        return run


register_backend(TritonBackend())
