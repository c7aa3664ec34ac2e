"""Ops: the unit-level ops' contract and fakes, the per-unit entry point, the eval fold."""

from fusedres.ops import library  # noqa: F401  (fake kernels of the C++ ops, for compile/export)
from fusedres.ops.unit import check_unit_inputs, conv_bn_act

__all__ = ["check_unit_inputs", "conv_bn_act"]
