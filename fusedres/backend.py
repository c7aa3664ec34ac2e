"""Backends: the contract every one implements, the registry, and how one is chosen.

A backend supplies the low-level ops of one unit ``y = act(bn(conv(x)) + residual)``
(DESIGN.md section 2). :class:`fusedres.ops.unit.ConvBNActFunction` composes them into forward
and backward, so a backend only writes kernels:

=================  ==========================================================================
op                 contract (z, y, dy, residual: [N, C, H, W], contiguous or channels_last)
=================  ==========================================================================
``conv``           ``z = conv2d(x, w)``; default: ATen.
``conv_backward``  ``(dx, dw)`` of ``conv``; default: ATen's ``convolution_backward``.
``bn_stats``       ``(mean, var)`` per channel, biased variance, in the *statistics dtype*
                   (float64 for float64 z, else float32).
``bn_act_fwd``     ``y = act(z*scale + shift + residual)``, scale/shift [C] in the statistics
                   dtype; y has z's dtype and memory format.
``bn_act_bwd``     ``(dz, dweight, dbias, dresidual)`` from dy, the saved y and z, mean/invstd
                   and weight (gamma, ones when not affine) [C]. ``training`` selects batch
                   statistics (dz carries the mean/variance terms) or running ones.
                   ``dresidual`` (= the ReLU-masked dy) is ``None`` unless ``has_residual``.
=================  ==========================================================================

Choosing: a module's ``backend=`` argument, else :func:`set_backend`, else the environment
variable ``FUSEDRES_BACKEND``, else ``"auto"``. ``auto`` picks the fastest usable backend for
the input's device.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

BACKEND_NAMES = ("eager", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cpu": ("cpu", "eager"), "cuda": ("triton", "cuda", "eager")}


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


def in_memory_format_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` in x's memory format, as ATen's convolution of ``x`` would return it.

    Fused CUDA backends compute in channels_last (the layout their kernels and cuDNN's tensor-core
    convolutions want) and hand results back in the caller's layout; a channels_last model pays no
    copy. t, x: [N, C, H, W].
    """
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


class Backend:
    """Base class of a backend: ATen convolutions, subclasses supply the BatchNorm ops.

    The three composite methods (``forward_train``, ``forward_eval``, ``backward``) are what
    :class:`fusedres.ops.unit.ConvBNActFunction` calls. Here they compose the primitive ops; a
    backend with fused convolution kernels (F1, F2, F3, B2 in DESIGN.md) overrides them.
    """

    name = "base"
    #: device types (``torch.device.type``) whose tensors this backend runs on.
    device_types: tuple = ()
    #: activation dtypes its kernels take; None: every floating dtype.
    dtypes: Optional[tuple] = None

    def availability(self) -> tuple[bool, str]:
        """Returns (usable here, why or why not)."""
        return True, "always available"

    # -- convolution -------------------------------------------------------------------------

    def conv(self, x, weight, stride, padding, dilation, groups):
        """``z = conv2d(x, weight)`` without bias. x: [N, Cin, H, W] -> z: [N, Cout, Ho, Wo]."""
        return F.conv2d(x, weight, None, stride, padding, dilation, groups)

    def conv_backward(self, dz, x, weight, stride, padding, dilation, groups, need_dx, need_dw):
        """Returns (dx or None, dw or None) for ``conv``."""
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dz, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0],
            groups, [need_dx, need_dw, False])
        return dx, dw

    # -- BatchNorm ---------------------------------------------------------------------------

    def bn_stats(self, z):
        raise NotImplementedError

    def bn_act_fwd(self, z, scale, shift, residual: Optional[torch.Tensor], relu: bool):
        raise NotImplementedError

    def bn_act_bwd(self, dy, y, z, mean, invstd, weight, relu: bool, has_residual: bool,
                   training: bool):
        raise NotImplementedError

    # -- composites (what the autograd Function calls) ----------------------------------------

    def forward_train(self, x, weight, gamma, beta, residual, relu: bool, eps: float,
                      conv: ConvParams):
        """Training forward with batch statistics.

        Args:
            x: [N, Cin, H, W]; weight: [Cout, Cin/groups, kh, kw]; gamma, beta: [Cout] in the
                statistics dtype; residual: [N, Cout, Ho, Wo] or None.

        Returns:
            (y, z, mean, var, invstd): y, z [N, Cout, Ho, Wo]; mean, biased var, invstd [Cout].
        """
        z = self.conv(x, weight, *conv)
        mean, var = self.bn_stats(z)
        invstd = torch.rsqrt(var + eps)
        scale = gamma * invstd
        shift = beta - mean * scale
        y = self.bn_act_fwd(z, scale, shift, residual, relu)
        return y, z, mean, var, invstd

    def forward_eval(self, x, weight, scale, shift, residual, relu: bool, conv: ConvParams):
        """Forward with fixed per-channel scale/shift (eval-mode BN folded).

        Returns:
            (y, z): z may be None when the backend fused the conv with its epilogue and the
            backward does not need it.
        """
        z = self.conv(x, weight, *conv)
        return self.bn_act_fwd(z, scale, shift, residual, relu), z

    def backward(self, dy, x, weight, y, z, mean, invstd, gamma, relu: bool, has_residual: bool,
                 training: bool, conv: ConvParams, needs: tuple):
        """Backward of one unit.

        Args:
            y: the unit's output, or None when ``relu`` is False (no mask to read).
            needs: (dx, dweight, dgamma_dbeta) booleans: which gradients are wanted.

        Returns:
            (dx, dweight, dgamma, dbeta, dresidual), each None where not wanted.
        """
        dz, dgamma, dbeta, dres = self.bn_act_bwd(dy, y, z, mean, invstd, gamma, relu,
                                                  has_residual, training)
        dx, dw = self.conv_backward(dz, x, weight, *conv, need_dx=needs[0], need_dw=needs[1])
        if not needs[2]:
            dgamma = dbeta = None
        return dx, dw, dgamma, dbeta, dres

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
