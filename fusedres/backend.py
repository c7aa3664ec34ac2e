"""Backends: the contract every one implements, the registry, and how one is chosen.

A backend runs the unit ``y = act(bn(conv(x)) + residual)`` (docs/design.md section 2) as one
op call per phase, with autograd registered on the ops (docs/design.md section 4):

=================  ==========================================================================
method             contract (x: [N, Cin, H, W]; y, residual: [N, Cout, Ho, Wo])
=================  ==========================================================================
``unit_train``     batch statistics; updates the running statistics given to it in place,
                   exactly like nn.BatchNorm2d (``momentum=None``: cumulative average, read
                   on the device); returns y, differentiable in x, weight, gamma, beta and
                   residual.
``unit_eval``      running statistics (scale and shift computed inside the op); y, with exact
                   gradients for x, weight, gamma, beta and residual.
``unit_infer``     the eval forward when no gradient is wanted: BatchNorm folded into the
                   convolution's weights and bias, cached per parameter version
                   (:mod:`fusedres.ops.fold`); defaults to ``unit_eval``.
``infer_runner``   ``unit_infer`` with everything but the input and the residual bound, for
                   repeated inference calls of one signature (the inference plans of
                   :mod:`fusedres.ops.unit`); it may write y into a residual its caller says
                   is dead. Defaults to calling ``unit_infer``.
``block_ops``      the ops a whole block's training step runs on (:class:`BlockOps`, for
                   :mod:`fusedres.ops.block`), or None (the default): per-unit blocks.
=================  ==========================================================================

Choosing: a module's ``backend=`` argument, else :func:`set_backend`, else the environment
variable ``FUSEDRES_BACKEND``, else ``"auto"``. ``auto`` picks the fastest usable backend for
the input's device.
"""

from __future__ import annotations

import os
import weakref
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

BACKEND_NAMES = ("eager", "cpu", "triton", "cuda")
# On CUDA tensors the cuda backend (cuDNN convolutions, C++ BN kernels) comes first: on an H200
# it ran a bf16 resnet50 training step at 1.31x eager and eval at 1.85x, the triton backend at
# 0.52x and 1.31x (benchmarks/results/nvidia-h200); triton serves where the extension is not
# built with its CUDA kernels.
_AUTO_ORDER = {"cpu": ("cpu", "eager"), "cuda": ("cuda", "triton", "eager")}


class ConvParams(NamedTuple):
    """The geometry of a unit's convolution (each a pair, as nn.Conv2d stores them)."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


def conv_output_hw(hw: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """(Ho, Wo) of a convolution over an (H, W) input; each geometry argument is a pair."""
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def explicit_padding(x: torch.Tensor, conv: nn.Conv2d) -> Optional[tuple[int, int, int, int]]:
    """``F.pad``'s ``(left, right, top, bottom)`` where a CPU convolution pads beyond its
    kernel's half-span (some padding > dilation * (kernel - 1) // 2), else None.

    Such a convolution runs on the explicitly zero-padded input with padding 0: the same sums.
    oneDNN's brgemm convolutions in torch 2.13 and 2.14 on an AMX Xeon crash the process
    (segmentation fault, eager PyTorch too) on some of these geometries in float16 and
    bfloat16, e.g. a 1x1 with dilation 2, stride 2 and padding 1 on a map one pixel wide, or a
    3x3 with dilation 2, stride 2 and padding 3 on a map one pixel high (docs/design.md
    section 4). ResNets never pad beyond the half-span, so their convolutions never take this
    path.

    Args:
        x: the convolution's input [N, Cin, H, W] (anything else: None, its checks name it).
        conv: the nn.Conv2d (zero padding; string paddings never exceed the half-span).
    """
    if (not isinstance(x, torch.Tensor) or x.device.type != "cpu"
            or isinstance(conv.padding, str)):
        return None
    (ph, pw), (kh, kw), (dh, dw) = conv.padding, conv.kernel_size, conv.dilation
    if ph <= dh * (kh - 1) // 2 and pw <= dw * (kw - 1) // 2:
        return None
    return pw, pw, ph, ph


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` when the [N, C, H, W] tensor t is channels_last-dense and not also
    NCHW-contiguous (C == 1 or H == W == 1 make both true), else ``torch.contiguous_format``: the
    rule every op of fusedres applies to choose its outputs' layout (csrc/common/checks.h)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def one_pixel_map(x: torch.Tensor, weight: torch.Tensor, conv: ConvParams) -> bool:
    """Whether the convolution maps a dense one-pixel x [N, C, 1, 1] to one pixel [N, Cout, 1, 1].

    Both layouts are then the same memory (memory_format_of says NCHW), so the kernels made for
    channels_last may take x as it is, and their output differs from NCHW's only in the strides
    of its size-1 dims. Late stages of small images (layer4 of a ResNet at 32x32) are such maps.
    The cpu backend's GEMM convolutions (csrc/cpu/gemm_conv.cpp) take such maps by the same rule.
    """
    return (x.dim() == 4 and x.shape[2] == 1 and x.shape[3] == 1 and x.is_contiguous()
            and conv_output_hw((1, 1), weight.shape[2:], conv.stride, conv.padding,
                               conv.dilation) == (1, 1))


def in_memory_format_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in x's memory format, as ATen's convolution of ``x`` would return it.

    Fused CUDA backends compute in channels_last (the layout their kernels and cuDNN's tensor-core
    convolutions want) and hand results back in the caller's layout; a channels_last model pays no
    copy. t, x: [N, C, H, W].
    """
    return t.contiguous(memory_format=memory_format_of(x))


def contents_key(t: torch.Tensor) -> tuple:
    """What a cache of values computed from ``t`` compares to tell whether t still holds the
    values it was computed from, for as long as the cache keeps t itself (or keys it by id while
    t lives): t's version counter, which every in-place op bumps, and where its values live. A
    swap under ``t.data = other`` keeps the version but moves t to other's storage, so the
    storage is keyed too, by a weak reference: unlike its address, never equal to that of a
    storage freed and then allocated again. Writes through ``t.data`` are seen by neither (as by
    autograd's own checks); see :func:`fusedres.ops.fold.clear_fold_cache`.

    Raises:
        RuntimeError: for an inference tensor (it has no version counter).
    """
    return t._version, weakref.ref(t.untyped_storage()), t.storage_offset()


class BlockOps(NamedTuple):
    """The ops the block-level op (:mod:`fusedres.ops.block`) runs on one backend.

    Attributes:
        train: the backend's ``unit_train`` op, returning ``(y, z, mean, invstd)``
            (the schema of :mod:`fusedres.ops.unit_schema`).
        backward: the backend's ``unit_backward`` op.
        bn_act_fwd: ``(z, scale, shift, residual or None, relu) -> act(z*scale + shift +
            residual)``; z, residual [N, C, H, W], scale and shift [C] in the statistics dtype.
            Backward rebuilds the activations that only feed the next convolution with it.
        conv: ``(x, weight, stride, padding, dilation, groups) -> z``, the convolution exactly
            as ``train`` runs it (for the opt-in recomputation of a Bottleneck's 1x1 conv1).
        train_from_z: None, or the F3 forward of a unit whose input is the previous unit's
            ``act(z*scale + shift)``, applied while the convolution loads its operand, so that
            this input is never written: ``(z_prev, scale_prev, shift_prev, weight, gamma, beta,
            residual, running_mean, running_var, num_batches_tracked, stride, padding, dilation,
            groups, relu, momentum, eps, write_y) -> (y, z, mean, invstd, scale, shift)``, the
            arguments and results of ``train`` otherwise, with y a [0] placeholder unless
            ``write_y``, and the unit's coefficients ``scale = gamma*invstd``, ``shift = beta -
            mean*scale`` ([C], statistics dtype), which the next unit's load applies and
            backward's rebuild reuses; with scale_prev and shift_prev None, z_prev is a plain
            input (the block's first unit).
            Without it the block runs ``train`` on each unit's output in turn.
        block_backward: None, or the block's whole backward as one op with the schema of
            ``fusedres::block_backward`` (csrc/unit_ops.h): what the block op's Python loop over
            ``backward`` and ``bn_act_fwd`` computes (:func:`fusedres.ops.block.backward_units`),
            in one call; not used with ``train_from_z``.
    """

    train: Callable
    backward: Callable
    bn_act_fwd: Callable
    conv: Callable
    train_from_z: Optional[Callable] = None
    block_backward: Optional[Callable] = None


class Backend:
    """Base class of a backend: its unit ops, where it runs, and whether it is usable here.

    ``gamma``/``beta`` may be None (``affine=False``), ``running_mean``/``running_var``/
    ``num_batches_tracked`` None when the statistics are not tracked (or, in training, not to be
    updated). ``conv`` is the unit's :class:`ConvParams`.
    """

    name = "base"
    #: device types (``torch.device.type``) whose tensors this backend runs on.
    device_types: tuple = ()
    #: activation dtypes its kernels take; None: every floating dtype.
    dtypes: Optional[tuple] = None

    def availability(self) -> tuple[bool, str]:
        """Returns (usable here, why or why not)."""
        return True, "always available"

    def unit_train(self, x, weight, gamma, beta, residual, running_mean, running_var,
                   num_batches_tracked, conv: ConvParams, relu: bool, momentum: Optional[float],
                   eps: float) -> torch.Tensor:
        """Training forward with batch statistics. Returns y [N, Cout, Ho, Wo]."""
        raise NotImplementedError

    def unit_eval(self, x, weight, gamma, beta, residual, running_mean, running_var,
                  conv: ConvParams, relu: bool, eps: float) -> torch.Tensor:
        """Forward with the running statistics. Returns y [N, Cout, Ho, Wo]."""
        raise NotImplementedError

    def unit_infer(self, conv_module: nn.Conv2d, x, weight, gamma, beta, residual, running_mean,
                   running_var, conv: ConvParams, relu: bool, eps: float) -> torch.Tensor:
        """``unit_eval`` when nothing needs a gradient; ``conv_module`` keys the fold cache.

        ``weight`` comes in its own dtype (under autocast, not yet cast to x's): a fold casts it
        once per parameter version, instead of once per call.
        """
        return self.unit_eval(x, weight.to(x.dtype), gamma, beta, residual, running_mean,
                              running_var, conv, relu, eps)

    def infer_runner(self, conv_module: nn.Conv2d, x, weight, gamma, beta, residual,
                     running_mean, running_var, conv: ConvParams, relu: bool,
                     eps: float) -> Callable:
        """``unit_infer`` bound to one unit and to the signature of ``x`` and ``residual``.

        Args: as :meth:`unit_infer`; ``x`` and ``residual`` are examples: the runner is called
            only with tensors of the same shape, strides, dtype and device, and only while the
            unit's tensors keep their identities and versions (the plan's key guarantees both),
            so a backend may decide its path and fold its weights once, here. It keeps neither
            example.

        Returns:
            ``run(x, residual, residual_is_dead) -> y``. With ``residual_is_dead`` the caller
            never reads ``residual`` again, and ``run`` may write y into it (and return it): one
            activation less allocated and streamed through the caches, as inductor's in-place
            convolution + sum does. The default always allocates y.
        """
        del x, residual  # the default decides nothing from them

        def run(x, residual, residual_is_dead):
            return self.unit_infer(conv_module, x, weight, gamma, beta, residual, running_mean,
                                   running_var, conv, relu, eps)
        return run

    def block_ops(self) -> Optional[BlockOps]:
        """The ops of the block-level op on this backend; None (the default) keeps blocks on
        the per-unit path."""
        return None

    def __repr__(self):
        return f"<fusedres backend {self.name!r}>"


_REGISTRY: dict[str, Backend] = {}
_global_choice: Optional[str] = None


def register_backend(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _ensure_registered():
    # Imported on first use: the backend modules import fusedres.ops, which imports this module.
    from fusedres import backends  # noqa: F401  (registers every backend)


def get_backend(name: str) -> Backend:
    """Returns the backend object called ``name`` (one of BACKEND_NAMES)."""
    _ensure_registered()
    if name not in BACKEND_NAMES and name not in _REGISTRY:
        raise ValueError(f"backend must be one of {BACKEND_NAMES + ('auto',)}, got {name!r}")
    if name not in _REGISTRY:
        raise RuntimeError(f"fusedres backend {name!r} is not registered in this installation")
    return _REGISTRY[name]


def available_backends() -> dict[str, tuple[bool, str]]:
    """Maps every backend name to (usable here, reason)."""
    _ensure_registered()
    return {name: (_REGISTRY[name].availability() if name in _REGISTRY
                   else (False, "not registered in this installation"))
            for name in BACKEND_NAMES}


def _check_name(name: str, what: str) -> str:
    if name != "auto" and name not in BACKEND_NAMES and name not in _REGISTRY:
        raise ValueError(f"{what} must be one of {BACKEND_NAMES + ('auto',)}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Sets the process-wide backend used by modules built without ``backend=``.

    Args:
        name: a name from BACKEND_NAMES, ``"auto"``, or None to fall back to the environment
            variable ``FUSEDRES_BACKEND`` (then ``"auto"``).
    """
    global _global_choice
    _global_choice = None if name is None else _check_name(name, "set_backend(name)")


def current_backend_name(requested: Optional[str] = None) -> str:
    """The name in force: ``requested``, else set_backend's, else FUSEDRES_BACKEND, else auto."""
    if requested is not None:
        return _check_name(requested, "backend")
    if _global_choice is not None:
        return _global_choice
    env = os.environ.get("FUSEDRES_BACKEND")
    if env:
        return _check_name(env, "the environment variable FUSEDRES_BACKEND")
    return "auto"


def resolve(requested: Optional[str], device: torch.device,
            dtype: Optional[torch.dtype] = None) -> Backend:
    """The backend that runs tensors on ``device`` (of ``dtype``) for the ``requested`` name.

    ``auto`` skips backends whose kernels do not take ``dtype`` (float64 on a GPU runs through
    the cuda backend, not triton); a backend named explicitly raises on such input itself.

    Raises:
        RuntimeError: an explicitly named backend that cannot run here, with the reason.
    """
    name = current_backend_name(requested)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("eager",)):
            backend = get_backend(candidate)
            if (device.type in backend.device_types
                    and (dtype is None or backend.dtypes is None or dtype in backend.dtypes)
                    and backend.availability()[0]):
                return backend
        return get_backend("eager")
    backend = get_backend(name)
    ok, why = backend.availability()
    if not ok:
        raise RuntimeError(f"fusedres backend {name!r} is not usable here: {why}")
    if device.type not in backend.device_types:
        raise RuntimeError(
            f"fusedres backend {name!r} runs on {'/'.join(backend.device_types)} tensors, "
            f"but the input is on {device}; use backend='auto' or move the model")
    return backend
