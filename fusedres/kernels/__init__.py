"""Triton kernels and their launchers (used by fusedres.backends.triton; imports triton).

- ``bn``: BatchNorm statistics, scale/shift + residual + ReLU, fused backward.
- ``conv``: implicit-GEMM NHWC convolution with BN epilogues (F1 statistics, F2 eval affine).

Under ``TRITON_INTERPRET=1`` these modules must be imported after the variable is set: triton
decides at decoration time whether a ``@triton.jit`` function is interpreted.
"""

from fusedres.kernels import _interpreter_compat

_interpreter_compat.apply()
