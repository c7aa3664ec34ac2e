"""scripts/gpu_tests.sh --dry-run: the GPU test call's commands, collecting only, on the CPU.

The script runs on a device machine only when a task draws one, where a broken command would
waste the call: this runs its groups here (pytest collecting only) and checks the summary.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_tests.sh")

pytestmark = pytest.mark.slow


def test_dry_run_collects_every_group_and_prints_the_summary_last(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_TESTS_BUDGET"}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip())
    collected = dict(re.findall(r"^\| (\w+) \| (\d+) \|$", summary, flags=re.M))
    assert set(collected) == {"cuda_backend", "kernels", "rest"}, summary
    # The Triton kernel tests collect everywhere (interpreted here); the cuda backend's module
    # skips itself without a GPU.
    assert int(collected["kernels"]) > 100, summary
    log = (tmp_path / "tests.log").read_text()
    # no group failed to collect (pytest: "ERROR collecting ...", "N errors")
    assert "ERROR collecting" not in log and not re.search(r"\d+ errors?\b", log), log[-3000:]
    # a device call brings back at most 8 files, none in folders
    assert len(os.listdir(tmp_path)) <= 8


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", SCRIPT, "--fast"], capture_output=True, text=True)
    assert done.returncode == 64 and "usage" in done.stderr
