"""The ``cpu`` and ``cuda`` backends: C++ kernels of fusedres._C behind torch.ops.fusedres.*.

Both call the same torch.library ops (csrc/fusedres.cpp); the dispatcher picks the CPU kernels
(csrc/cpu) or the CUDA kernels (csrc/cuda) from the tensors' device. Convolutions go through ATen
(oneDNN on CPU; cuDNN in channels_last on CUDA, see :class:`CudaBackend`).
"""

import torch

from fusedres import _ext
from fusedres.backend import Backend, ConvParams, in_memory_format_of, register_backend


class ExtensionBackend(Backend):
    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_types = (device_type,)

    def availability(self):
        if not _ext.extension_loaded():
            return False, _ext.EXTENSION_ERROR
        if self.device_types == ("cuda",):
            if not _ext.cuda_kernels_built():
                return False, "fusedres._C was built without the CUDA kernels"
            if not torch.cuda.is_available():
                return False, "CUDA kernels are built but torch sees no CUDA device"
        return True, "fusedres._C loaded"

    def bn_stats(self, z):
        return torch.ops.fusedres.bn_stats(z)

    def bn_act_fwd(self, z, scale, shift, residual, relu):
        return torch.ops.fusedres.bn_act_fwd(z, scale, shift, residual, relu)

    def bn_act_bwd(self, dy, y, z, mean, invstd, weight, relu, has_residual, training):
        # Without ReLU the kernels never read y (the unit does not keep it); the op's schema
        # still takes a Tensor there, and z, same shape and layout, costs no copy.
        y = y if relu else z
        dz, dweight, dbias, dres = torch.ops.fusedres.bn_act_bwd(
            dy, y, z, mean, invstd, weight, relu, has_residual, training)
        return dz, dweight, dbias, (dres if has_residual else None)


class CudaBackend(ExtensionBackend):
    """The ``cuda`` backend: csrc/cuda for the BatchNorm parts, cuDNN convolutions in channels_last.

    cuDNN's tensor-core convolutions and the BN kernels (which walk [N*H*W, C]) both want NHWC.
    So the convolutions take a channels_last input (a copy only where the caller's activations are
    NCHW), z stays channels_last and the BN kernels read it without a copy, and y comes back in
    the caller's memory format, as the triton backend does. float64 convolutions stay NCHW (cuDNN
    has no NHWC kernels for them) and the ops copy z instead.
    """

    def __init__(self):
        super().__init__("cuda", "cuda")

    def conv(self, x, weight, stride, padding, dilation, groups):
        return super().conv(_channels_last(x), weight, stride, padding, dilation, groups)

    def conv_backward(self, dz, x, weight, stride, padding, dilation, groups, need_dx, need_dw):
        # The same layout as the forward, so cuDNN runs NHWC kernels and does not copy dz back.
        return super().conv_backward(dz, _channels_last(x), weight, stride, padding, dilation,
                                     groups, need_dx, need_dw)

    def forward_train(self, x, weight, gamma, beta, residual, relu, eps, conv: ConvParams):
        y, z, mean, var, invstd = super().forward_train(x, weight, gamma, beta, residual, relu,
                                                        eps, conv)
        return in_memory_format_of(y, x), z, mean, var, invstd

    def forward_eval(self, x, weight, scale, shift, residual, relu, conv: ConvParams):
        y, z = super().forward_eval(x, weight, scale, shift, residual, relu, conv)
        return in_memory_format_of(y, x), z


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


register_backend(ExtensionBackend("cpu", "cpu"))
register_backend(CudaBackend())
