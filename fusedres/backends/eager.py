"""The ``eager`` backend: the reference composition in plain PyTorch, on any device.

Modules on this backend run :func:`fusedres.reference.unit_forward` (``nn.Conv2d``,
``nn.BatchNorm2d``, add, ReLU) and leave autograd to PyTorch, so it is the oracle and the
fallback; it has no unit ops of its own.
"""

from fusedres.backend import Backend, register_backend


class EagerBackend(Backend):
    name = "eager"
    device_types = ("cpu", "cuda", "mps", "xpu", "meta")
    #: modules call the reference composition instead of the unit ops.
    uses_reference_composition = True


register_backend(EagerBackend())
