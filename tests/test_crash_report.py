"""scripts/crash_report.sh on a command that loads the extension and then segfaults.

The GPU validation runs the report only when a post-build check dies of a signal on a device
machine, where nothing can be rerun by hand: every section must work the first time.
"""

import os
import shutil
import subprocess
import sys

import pytest

from fusedres import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "crash_report.sh")
CRASH = "from fusedres import _ext; _ext._C.build_info(); import ctypes; ctypes.string_at(0)"

# One worker runs the whole module under pytest-xdist, so the report (a module fixture, about 20 s
# of crashing processes and debuggers) runs once.
pytestmark = [pytest.mark.skipif(_ext._C is None, reason="the extension is not built"),
              pytest.mark.xdist_group("crash_report")]


@pytest.fixture(scope="module")
def report() -> str:
    env = dict(os.environ, CRASH_REPORT_TIMEOUT="120",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(["bash", SCRIPT, sys.executable, "-c", CRASH], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bindings_count_the_extensions_cpp_runtime_references(report):
    section = report.split("== bindings")[1].split("== preload")[0]
    assert "(CMD exit status under LD_DEBUG: 139)" in section
    # The extension's std:: references: most bind to libstdc++, and each line of the count
    # names a library.
    counts = section.split("-- how many bind to each library:")[1].split("--")[0].split()
    libraries = counts[1::2]
    assert "libstdc++.so.6" in libraries, section
    assert all(n.isdigit() for n in counts[0::2]), section


def test_preload_reruns_with_a_libstdcxx_first(report):
    section = report.split("== preload")[1].split("== backtrace")[0]
    lines = [line for line in section.splitlines() if line.startswith("exit ")]
    assert lines, section
    assert all(line.startswith("exit 139 with LD_PRELOAD=/") and "libstdc++.so.6" in line
               for line in lines), section


@pytest.mark.skipif(not (shutil.which("gdb") or shutil.which("cuda-gdb")),
                    reason="no debugger installed")
def test_backtrace_shows_the_signal_and_the_frame(report):
    section = report.split("== backtrace")[1]
    assert "received signal SIGSEGV" in section, section[:2000]
    assert "string_at" in section, section[:2000]
    assert "fusedres/_C" in section  # the loaded C++ runtimes and the extension, with paths


def test_usage_without_a_command():
    done = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 64 and "usage" in done.stderr
