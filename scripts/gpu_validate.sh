#!/usr/bin/env bash
# One-command validation of fusedres on a CUDA machine (no internet needed):
#
#   bash scripts/gpu_validate.sh       # logs, JSON, plots in ./gpu_validation/ (or $OUT, packed)
#
# Stages, each under its own `timeout` so one hang cannot eat the budget; a failing stage is
# recorded and the next one runs. Most informative first, since the budget may cut the last ones:
#   env           nvidia-smi, versions
#   build         pip install -e . --no-build-isolation --no-deps (MAX_JOBS=16, this GPU's arch)
#   peaks         device peaks: copy of a 1 GiB tensor (GB/s, read + write) and a bf16
#                 8192^3 matmul (TFLOP/s) -> peaks.json, the reference of the benchmarks' ratios
#   tests_cuda    pytest -m cuda: everything that runs on the GPU (the Triton kernel matrix, the
#                 cuda backend, ResNet-50 shapes), junit xml
#   main          python -m fusedres (fused vs eager error check, timing table, JSON, PNG)
#   bench_models  pytest benchmarks/test_bench_models.py --benchmark-only --benchmark-json
#   bench_blocks  pytest benchmarks/ (everything but the models) --benchmark-only --benchmark-json
#   main_compile  python -m fusedres with torch.compile beside eager channels_last (the inductor
#                 compile of ResNet-50 takes a minute or more)
#   tests_cpu     pytest -m "not cuda": the rest of the suite (CI runs it too), in parallel
#                 when pytest-xdist is installed
# and prints a short table last (also in summary.txt). The whole run is held under
# GPU_VALIDATE_BUDGET seconds (default 520, for a 9-minute slot on an H100): each stage's limit
# is cut to what is left. The benchmarks skip torch.compile here (FUSEDRES_BENCH_COMPILE=0);
# main_compile carries that comparison. GPU_VALIDATE_SKIP="build tests_cpu" (say) skips stages
# by name, e.g. to split the run over two calls of a lease: the extension built by the first
# stays in the tree for the second.
#
# Where the results go: ./gpu_validation/ (GPU_VALIDATE_DIR overrides). When $OUT is set (a
# device lease, which returns at most 8 files), the folder is packed into
# $OUT/gpu_validation.tgz after every stage, beside $OUT/stages.txt and, at the end,
# $OUT/summary.txt, so a run cut short still returns what it finished.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${OUT:-}" ]]; then
  OUTDIR="${GPU_VALIDATE_DIR:-/tmp/fusedres_gpu_validation}"
else
  OUTDIR="${GPU_VALIDATE_DIR:-$ROOT/gpu_validation}"
fi
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
# The GPU machines' interpreter with torch is python3 (there may be no `python`).
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET="${GPU_VALIDATE_BUDGET:-520}"
START=$(date +%s)
STAGES=()

# Packs the results folder into $OUT (when set): called after every stage.
pack() {
  [[ -n "${OUT:-}" ]] || return 0
  printf '%s\n' "${STAGES[@]}" >"$OUT/stages.txt"
  tar czf "$OUT/gpu_validation.tgz.part" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" &&
    mv "$OUT/gpu_validation.tgz.part" "$OUT/gpu_validation.tgz"
}

# stage NAME LIMIT_SECONDS CMD...: runs CMD with stdout+stderr in $OUTDIR/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  if [[ " ${GPU_VALIDATE_SKIP:-} " == *" $name "* ]]; then
    STAGES+=("$name|skipped|0|GPU_VALIDATE_SKIP")
    echo "== $name: skipped (GPU_VALIDATE_SKIP)"
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  if ((left < 10)); then
    STAGES+=("$name|skipped|0|no time left in the ${BUDGET}s budget")
    echo "== $name: skipped (budget spent)"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s) -> $OUTDIR/$name.log"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0)) note="ok"
  if ((rc == 124 || rc == 137)); then
    note="TIMEOUT after ${limit}s"
  elif ((rc != 0)); then
    note="FAILED (exit $rc)"
  fi
  STAGES+=("$name|$rc|$dt|$note")
  echo "   $note in ${dt}s"
  tail -n 3 "$OUTDIR/$name.log" | sed 's/^/   | /'
  pack
}

env_info() {
  nvidia-smi
  echo
  "$PY" - <<'EOF'
import platform, subprocess, torch
print("python", platform.python_version(), "|", platform.platform())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| sm", f"{p.major}.{p.minor}", "|", p.total_memory // 2**20, "MiB |",
          p.multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton not importable:", e)
EOF
  nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not on PATH"
  gcc --version | head -n 1
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|matplotlib|fusedres)" || true
}

build() {
  local arch
  arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
  # Only this GPU's architecture: a quarter of the default build's nvcc time.
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-9.0}}" \
    "$PY" -m pip install -e . --no-build-isolation --no-deps -v
  "$PY" -c "import fusedres; [print(k, v) for k, v in fusedres.available_backends().items()]"
}

peaks() {
  "$PY" - "$OUTDIR/peaks.json" <<'EOF'
import json, sys, torch
dev = torch.device("cuda")

def timed(fn, n):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n

src = torch.empty(2**30, dtype=torch.uint8, device=dev).random_()
dst = torch.empty_like(src)
t_copy = timed(lambda: dst.copy_(src), 20)
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
t_mm = timed(lambda: a @ b, 20)
peaks = {"device": torch.cuda.get_device_name(dev),
         # a copy reads and writes every byte once
         "copy_GBps": 2 * 2**30 / t_copy / 1e9,
         "matmul_TFLOPs": 2 * 8192**3 / t_mm / 1e12,
         "how": "torch copy_ of a 1 GiB tensor; bf16 8192x8192x8192 matmul; 20 runs, CUDA events"}
json.dump(peaks, open(sys.argv[1], "w"), indent=1)
print(json.dumps(peaks, indent=1))
EOF
}

# `timeout` runs programs, not shell functions: export them to a child bash.
export -f env_info build peaks
export OUTDIR PY FUSEDRES_DEVICE_PEAKS="$OUTDIR/peaks.json"
# Every finished benchmark case appends a line here, so a stage cut by its timeout keeps results.
export FUSEDRES_BENCH_LOG="$OUTDIR/bench_cases.jsonl"
rm -f "$FUSEDRES_BENCH_LOG"
# -v: a stage cut by its timeout writes no junit xml, but its log says how far it got.
PYTEST=("$PY" -m pytest -p no:cacheprovider -v -rfE --maxfail=25)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
stage env 15 bash -c env_info
stage build 150 bash -c build
stage peaks 30 bash -c peaks
stage tests_cuda 170 "${PYTEST[@]}" tests -m cuda --junitxml="$OUTDIR/junit_cuda.xml"
stage main 90 "$PY" -m fusedres --device cuda --out "$OUTDIR/main"
stage bench_models 80 env FUSEDRES_BENCH_COMPILE=0 "$PY" -m pytest benchmarks/test_bench_models.py \
  --benchmark-only -q --benchmark-json="$OUTDIR/bench_models.json"
stage bench_blocks 80 env FUSEDRES_BENCH_COMPILE=0 "$PY" -m pytest benchmarks/ \
  --ignore=benchmarks/test_bench_models.py --benchmark-only -q \
  --benchmark-json="$OUTDIR/bench_blocks.json"
stage main_compile 100 "$PY" -m fusedres --device cuda --backends eager,eager_cl,compile \
  --out "$OUTDIR/main_compile"
stage tests_cpu 300 "${PYTEST[@]}" ${XDIST[@]+"${XDIST[@]}"} tests -m "not cuda" \
  --junitxml="$OUTDIR/junit_cpu.xml"

printf '%s\n' "${STAGES[@]}" >"$OUTDIR/stages.txt"
"$PY" - "$OUTDIR" <<'EOF' | tee "$OUTDIR/summary.txt"
import glob, json, os, sys
import xml.etree.ElementTree as ET
out = sys.argv[1]
print("\n==================== fusedres GPU validation ====================")
print(f"{'stage':14s} {'rc':>7s} {'seconds':>8s}  result")
for line in open(os.path.join(out, "stages.txt")).read().splitlines():
    name, rc, dt, note = line.split("|", 3)
    print(f"{name:14s} {rc:>7s} {dt:>8s}  {note}")
p = os.path.join(out, "peaks.json")
if os.path.exists(p):
    pk = json.load(open(p))
    print(f"\npeaks on {pk['device']}: copy {pk['copy_GBps']:.0f} GB/s, "
          f"bf16 matmul {pk['matmul_TFLOPs']:.0f} TFLOP/s")
for name in ("cuda", "cpu"):
    p = os.path.join(out, f"junit_{name}.xml")
    if os.path.exists(p):
        s = ET.parse(p).getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        print(f"tests_{name}: {s.get('tests')} run, {s.get('failures')} failures, "
              f"{s.get('errors')} errors, {s.get('skipped')} skipped, "
              f"{float(s.get('time', 0)):.0f}s")
for name in ("main", "main_compile"):
    p = os.path.join(out, name, "report.json")
    if os.path.exists(p):
        from fusedres.report import format_table
        print(f"\n[{name}]", format_table(json.load(open(p))))
p = os.path.join(out, "bench_cases.jsonl")
if os.path.exists(p):
    groups = {}
    for line in open(p):
        case = json.loads(line)
        groups.setdefault(case["group"], {})[case["extra_info"]["provider"]] = case
    print("\n[benchmarks] median ms per call (GB/s by the traffic model), speedup over eager")
    for g, provs in groups.items():
        eager = provs.get("eager", {}).get("median_s")
        cells = [f"{k} {v['median_s'] * 1e3:.2f}"
                 + (f" ({v['extra_info']['GB/s']:.3g})" if v["extra_info"].get("GB/s") else "")
                 + (f" {eager / v['median_s']:.2f}x" if eager and k != "eager" else "")
                 for k, v in provs.items()]
        print(f"  {g}: " + ", ".join(cells))
EOF
pack
[[ -n "${OUT:-}" ]] && cp "$OUTDIR/summary.txt" "$OUT/summary.txt"
echo "all logs, JSON and plots: $OUTDIR${OUT:+ (packed: $OUT/gpu_validation.tgz)} (total $(($(date +%s) - START))s)"
