"""Ops: the torch.library registrations of the C++ kernels and the per-unit autograd Function."""

from fusedres.ops import library  # noqa: F401  (fake kernels of the C++ ops, for compile/export)
from fusedres.ops.unit import ConvBNActFunction, check_unit_inputs, conv_bn_act

__all__ = ["ConvBNActFunction", "check_unit_inputs", "conv_bn_act"]
