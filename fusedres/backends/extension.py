"""The ``cpu`` and ``cuda`` backends: C++ kernels of fusedres._C behind torch.ops.fusedres.*.

Both call the same torch.library ops (csrc/fusedres.cpp); the dispatcher picks the CPU kernels
(csrc/cpu) or the CUDA kernels (csrc/cuda) from the tensors' device. Convolutions go through ATen
(oneDNN on CPU, cuDNN on CUDA).
"""

import torch

from fusedres import _ext
from fusedres.backend import Backend, register_backend


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


register_backend(ExtensionBackend("cpu", "cpu"))
register_backend(ExtensionBackend("cuda", "cuda"))
