"""The ``eager`` backend: the reference composition in plain PyTorch ops, on any device.

Modules on this backend run :func:`fusedres.reference.unit_forward` (``nn.Conv2d``,
``nn.BatchNorm2d``, add, ReLU) and leave autograd to PyTorch, so it is the oracle and the fallback.
Its op methods are the op-level references in the activations' own precision, which lets the
generic autograd Function be tested on any device.
"""

from fusedres import reference
from fusedres.backend import Backend, register_backend


class EagerBackend(Backend):
    name = "eager"
    device_types = ("cpu", "cuda", "mps", "xpu", "meta")
    #: modules call the reference composition instead of ConvBNActFunction.
    uses_reference_composition = True

    def bn_stats(self, z):
        return reference.bn_stats(z, upcast=False)

    def bn_act_fwd(self, z, scale, shift, residual, relu):
        return reference.bn_act_fwd(z, scale, shift, residual, relu, upcast=False)

    def bn_act_bwd(self, dy, y, z, mean, invstd, weight, relu, has_residual, training):
        return reference.bn_act_bwd(dy, y, z, mean, invstd, weight, relu, has_residual, training,
                                    upcast=False)


register_backend(EagerBackend())
