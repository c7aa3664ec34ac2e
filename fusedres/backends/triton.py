"""The ``triton`` backend: fused convolution + BatchNorm kernels written in Triton.

Runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` is set (tests only: the
interpreter is slow). The launchers run behind torch.library ops (``torch.ops.fusedres_triton``,
fusedres/ops/triton_library.py), so ``torch.compile`` and ``torch.export`` trace a model on this
backend without graph breaks. Triton and the kernels (fusedres.kernels) are imported on first
use, so ``import fusedres`` works, and stays light, without triton.

Fusion points (DESIGN.md section 2):

- training forward: the convolution's epilogue writes per-tile BN statistics (F1); a finalize
  merges them and computes invstd/scale/shift; one pass applies scale/shift + residual + ReLU (F2).
- eval forward: one convolution whose epilogue applies scale/shift + residual + ReLU (F2); z is
  never written.
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

from fusedres.backend import Backend, ConvParams, in_memory_format_of, register_backend
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

    # -- primitive ops: torch.ops.fusedres_triton (fusedres/ops/triton_library.py) ----------

    def conv(self, x, weight, stride, padding, dilation, groups):
        z = _ops.conv2d(x, weight, list(stride), list(padding), list(dilation), groups, None, None,
                        None, False)
        return in_memory_format_of(z, x)

    def bn_stats(self, z):
        mean, var = _ops.bn_stats(z).unbind(0)
        return mean, var

    def bn_act_fwd(self, z, scale, shift, residual, relu):
        return _ops.bn_act_fwd(z, scale, shift, residual, relu)

    def bn_act_bwd(self, dy, y, z, mean, invstd, weight, relu, has_residual, training):
        dz, sums, dres = _ops.bn_act_bwd(dy, y if relu else dy, z, mean, invstd, weight, relu,
                                         has_residual, training, True)
        dbias, dweight = sums.unbind(0)
        return dz, dweight, dbias, (dres if has_residual else None)

    # -- composites --------------------------------------------------------------------------

    def forward_train(self, x, weight, gamma, beta, residual, relu, eps, conv: ConvParams):
        z, stats = _ops.conv2d_bn_train(x, weight, *_geometry(conv), gamma, beta, eps)
        mean, var, invstd, scale, shift = stats.unbind(0)
        y = _ops.bn_act_fwd(z, scale, shift, residual, relu)
        # z stays channels_last (the layout the backward's kernels and cuDNN like best); y takes
        # x's memory format, as ATen's convolution would give it.
        return in_memory_format_of(y, x), z, mean, var, invstd

    def forward_eval(self, x, weight, scale, shift, residual, relu, conv: ConvParams):
        y = _ops.conv2d(x, weight, *_geometry(conv), scale, shift, residual, relu)
        # z = None: backward recomputes it only when dgamma/dbeta are wanted (see backward).
        return in_memory_format_of(y, x), None

    def backward(self, dy, x, weight, y, z, mean, invstd, gamma, relu, has_residual, training,
                 conv: ConvParams, needs: tuple):
        need_dx, need_dw, need_affine = needs
        if z is None and (training or need_affine):
            # Eval forward did not write z; dgamma needs it. Recomputing costs one convolution,
            # only in the rare "frozen statistics, trainable gamma" case.
            z = _ops.conv2d(x, weight, *_geometry(conv), None, None, None, False)
        # Without ReLU the kernels never read y (the unit does not keep it): dy stands in.
        dz, sums, dres = _ops.bn_act_bwd(dy, y if relu else dy, z, mean, invstd, gamma, relu,
                                         has_residual, training, need_affine)
        dx, dw = self.conv_backward(dz, x, weight, *conv, need_dx=need_dx, need_dw=need_dw)
        dbias, dgamma = sums.unbind(0) if need_affine else (None, None)
        return dx, dw, dgamma, dbias, (dres if has_residual else None)


def _geometry(conv: ConvParams) -> tuple:
    """(stride, padding, dilation, groups) as the ops' schema takes them (int lists)."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


register_backend(TritonBackend())
