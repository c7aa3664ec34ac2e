"""scripts/gpu_validate.sh --dry-run end to end: the GPU validation's code, run on the CPU.

The script is written for a GPU this project rarely gets, and its one call there must not be
spent on a Python error: this runs every stage of it here (the Triton interpreter, tiny shapes,
the cpu backend standing in for cuda, no torch.compile) and checks what it wrote. About 1.5
minutes on 2 cores; CI runs it as a step of its own (marked ``slow``):

    python -m pytest tests/test_gpu_validate_dry_run.py -q -p no:cacheprovider
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_validate.sh")
#: What the dry run must report: every stage, each of them run (warmup_compile: skipped).
STAGES = {"info", "build", "warmup_triton", "warmup_compile", "check", "bench"}
CHECK_GROUPS = {"unit", "block", "net_train", "net_eval"}
BENCH_PARTS = {"block", "model"}
KERNEL_PARTS = {"bn", "conv"}
#: The only skips a dry run may make: what it leaves out on purpose, never for the budget.
DRY_RUN_SKIPS = {"check net triton", "torch.compile"}

# One worker runs the whole module under pytest-xdist, so the dry run (a module fixture) runs once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gpu_validate_dry_run")]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(completed process, records) of one dry run into a temporary folder."""
    out = tmp_path_factory.mktemp("gpu_validate")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FUSEDRES_TRITON_CONFIG", "FUSEDRES_POISON_OUTPUTS", "GPU_VALIDATE_SKIP")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    with open(out / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    return done, records, out


def test_exits_zero_and_prints_the_summary_last(dry_run):
    done, _, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("**Verdict: PASS**"), done.stdout[-2000:]
    readme = (out / "README.md").read_text()
    for heading in ("## Stages", "## Correctness", "## ResNet-50 Bottleneck blocks",
                    "## Whole network", "## Kernels", "## Profile"):
        assert heading in readme
    # a device call brings back at most 8 files, none in folders
    assert len(os.listdir(out)) <= 8


def test_machine_recorded_first(dry_run):
    _, records, _ = dry_run
    assert records[0]["kind"] == "machine"
    assert records[0]["dry_run"] is True and records[0]["torch"]


def test_every_stage_reported(dry_run):
    _, records, _ = dry_run
    stages = {r["stage"]: r for r in records if r["kind"] == "stage"}
    assert set(stages) == STAGES
    for name, r in stages.items():
        assert r["status"] == ("skipped" if name == "warmup_compile" else "ok"), r


def test_post_build_checks_ran(dry_run):
    """The build stage's checks (backend usable; an op call the extension must refuse raises,
    where the first H200 runs segfaulted) ran in their own processes and passed."""
    _, _, out = dry_run
    log = (out / "build.log").read_text()
    assert "cpu     usable" in log, log[-2000:]
    assert "an op error on cpu raised as it should: fusedres::bn_act_fwd: scale must be" in log
    assert "crash report" not in log


def test_every_check_ran_and_passed(dry_run):
    _, records, _ = dry_run
    checks = [r for r in records if r["kind"] == "check"]
    assert {r["group"] for r in checks} == CHECK_GROUPS
    assert {r["backend"] for r in checks} == {"eager", "triton", "cpu"}
    assert {r["dtype"] for r in checks} == {"float16", "float32"}
    failed = [(r["group"], r["name"], r["backend"], r.get("dtype")) for r in checks
              if r["status"] != "pass"]
    assert not failed
    # a check that judged nothing cannot fail
    assert all(r["tensors"] for r in checks)


def test_every_measurement_recorded(dry_run):
    _, records, _ = dry_run
    assert {r["part"] for r in records if r["kind"] == "bench"} == BENCH_PARTS
    assert {r["part"] for r in records if r["kind"] == "kernel"} == KERNEL_PARTS
    for kind in ("peaks", "profile", "warm"):
        assert any(r["kind"] == kind for r in records), kind
    providers = {r["provider"] for r in records if r["kind"] == "bench"}
    assert providers == {"eager_cl", "triton", "cpu_cl"}


def test_nothing_raised_or_skipped_for_time(dry_run):
    _, records, _ = dry_run
    assert not [r for r in records if r["kind"] == "error"]
    assert {r["what"] for r in records if r["kind"] == "skip"} == DRY_RUN_SKIPS
