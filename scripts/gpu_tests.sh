#!/usr/bin/env bash
# The test suite's GPU tests in one device call, after scripts/gpu_validate.sh (whose build the
# device machine keeps between calls): most valuable first, each group cut off by its share of
# the budget, so that a call that runs out still brings back every result until then.
#
#   bash scripts/gpu_tests.sh             # results in $OUT when set, else ./gpu_validation/tests
#   bash scripts/gpu_tests.sh --dry-run   # the same commands collecting only, on any machine
#                                         # (tests/test_gpu_tests_dry_run.py, in CI)
#
# Groups, in order (the first H200 call ran 1212 of group 1 and 2's tests in 150 s, -n 8):
#   cuda_backend  tests/test_cuda_backend.py: the CUDA kernels against the CPU's, argument errors
#                 (where the first H200 run's worker segfaulted), BN state, autocast
#   kernels       tests/kernels: the Triton kernels compiled and run on the GPU, every config
#                 of the ResNet-50 shapes (FUSEDRES_TRITON_CONFIG=0 elsewhere: no autotuning)
#   rest          every other test marked `cuda` (DDP, ...)
# Each group may use its share of what is left: 45%, then 85%, then all, so time a group does
# not use goes to the next. The build runs first only if the extension lacks the CUDA kernels.
#
# Results (at most 6 files): tests.log (pytest's output, all groups), junit_<group>.xml,
# build.log (when it built), summary.md: per group passed / failed / errors / skipped and the
# failures' first lines, printed last on stdout.
# Exit status: 0 when no test failed or errored and every group ran to its end; 1 otherwise.
# Environment: OUT, PYTHON (default python3), GPU_TESTS_BUDGET (seconds, default 480),
# GPU_TESTS_WORKERS (pytest-xdist workers, default 8).
set -u
# shellcheck source=scripts/gpu_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"
gpu_script_setup gpu_validation/tests "$@"
rm -f "$OUTDIR"/tests.log "$OUTDIR"/junit_*.xml "$OUTDIR"/build.log "$OUTDIR"/summary.md
START=$(date +%s)
BUDGET="${GPU_TESTS_BUDGET:-480}"
END=$((START + BUDGET))
RESERVE=10  # kept for the summary
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1 FUSEDRES_TRITON_CONFIG=0

if ((!DRY)); then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "NO CUDA: torch sees no CUDA device; no test ran." | tee "$OUTDIR/summary.md"
    exit 2
  fi
  if ! "$PY" -c "import sys; from fusedres import _ext
sys.exit(0 if _ext._C is not None and _ext._C.cuda_kernels_built() else 1)" 2>/dev/null; then
    arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")"
    echo "== build (the extension lacks the CUDA kernels): sm $arch -> $OUTDIR/build.log"
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" \
      timeout $((END - RESERVE - $(date +%s))) "$PY" setup.py build_ext --inplace \
      >"$OUTDIR/build.log" 2>&1 || echo "   build failed (exit $?): the cuda tests will say so"
  fi
fi

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfE -o console_output_style=classic)
if ((DRY)); then
  PYTEST+=(--collect-only)
else
  PYTEST+=(-n "${GPU_TESTS_WORKERS:-8}")
  # A hung test must not hold its group to the deadline, where that plugin is installed.
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 180)
fi

# run_group NAME SHARE_PERCENT PYTEST_ARGS...: pytest within SHARE% of the time left.
STATUS=0
run_group() {
  local name=$1 share=$2
  shift 2
  local now left limit rc
  now=$(date +%s)
  left=$((END - RESERVE - now))
  limit=$((left * share / 100 - 20))
  if ((limit < 20)); then
    echo "== $name: skipped (${left}s left)" | tee -a "$OUTDIR/tests.log"
    echo "$name skipped" >>"$OUTDIR/.groups"
    STATUS=1
    return
  fi
  echo "== $name: up to ${limit}s: ${*}" | tee -a "$OUTDIR/tests.log"
  # SIGINT at the deadline: pytest stops as on Ctrl-C and still writes its summary and the JUnit
  # file of what ran; killed only if it has not ended 20 s later.
  timeout -s INT -k 20 "$limit" "${PYTEST[@]}" --junitxml="$OUTDIR/junit_$name.xml" "$@" \
    >>"$OUTDIR/tests.log" 2>&1
  rc=$?
  # pytest: 0 passed, 5 nothing collected (a group with no test here is not a failure).
  ((rc == 124 || rc == 137)) && echo "$name cut off at ${limit}s" >>"$OUTDIR/.groups"
  ((rc != 0 && rc != 5)) && STATUS=1
  echo "   $name: exit $rc in $(($(date +%s) - now))s" | tee -a "$OUTDIR/tests.log"
}

rm -f "$OUTDIR/.groups"
run_group cuda_backend 45 tests/test_cuda_backend.py
run_group kernels 85 tests/kernels
run_group rest 100 tests -m cuda --ignore=tests/test_cuda_backend.py --ignore=tests/kernels

"$PY" - "$OUTDIR" "$DRY" "$(($(date +%s) - START))" <<'EOF' | tee "$OUTDIR/summary.md"
"""Per group: passed, failed, errors, skipped from its JUnit file, and the failures (a dry
run: how many tests each group collected, from tests.log)."""
import os
import re
import sys
import xml.etree.ElementTree as ET

out, dry, seconds = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
notes = open(os.path.join(out, ".groups")).read().splitlines() if os.path.exists(
    os.path.join(out, ".groups")) else []
print(f"# GPU tests{' (dry run: collected only)' if dry else ''}, {seconds} s\n")
if dry:
    log = open(os.path.join(out, "tests.log")).read()
    print("| group | collected |")
    print("| --- | ---: |")
    for section in re.split(r"^== ", log, flags=re.M)[1:]:
        name = section.split(":", 1)[0]
        found = re.search(r"(\d+)(?:/\d+)? tests? collected", section)
        print(f"| {name} | {found.group(1) if found else 0} |")
    sys.exit(0)
print("| group | tests | passed | failed | errors | skipped |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
failures = []
for name in ("cuda_backend", "kernels", "rest"):
    path = os.path.join(out, f"junit_{name}.xml")
    if not os.path.exists(path):
        print(f"| {name} | - | - | - | - | - |")
        continue
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:  # cut off while pytest was writing it
        print(f"| {name} | unreadable junit ({e}) | | | | |")
        continue
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    print(f"| {name} | {counts['tests']} | {passed} | {counts['failures']} | "
          f"{counts['errors']} | {counts['skipped']} |")
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            first = (bad.get("message") or "").strip().splitlines()[:1]
            failures.append(f"- {case.get('classname')}::{case.get('name')}: "
                            f"{first[0][:300] if first else bad.tag}")
for note in notes:
    print(f"\n{note}")
if failures:
    print("\n## Failures and errors\n")
    print("\n".join(failures[:60]))
    if len(failures) > 60:
        print(f"... and {len(failures) - 60} more (junit_*.xml)")
EOF
rm -f "$OUTDIR/.groups"
exit $STATUS
