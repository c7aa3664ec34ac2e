"""scripts/check_triton_compile.py: every kernel compiles for sm_80 and sm_90 without a GPU.

Runs in a subprocess with TRITON_INTERPRET removed (this process may be interpreting, and triton
fixes that mode at import). CI compiles the first config of each table (``--quick``, about half a
minute on 2 cores); ``python scripts/check_triton_compile.py`` compiles all of them.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "check_triton_compile.py")


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True,
                          env=env, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    for arch, mma in (("sm_80", " mma "), ("sm_90", " wgmma ")):
        conv_rows = [line for line in proc.stdout.splitlines()
                     if line.startswith(arch) and " conv" in line]
        assert len(conv_rows) >= 5, report
        assert all(mma in row for row in conv_rows), report
