# Sourced by scripts/gpu_validate.sh and scripts/gpu_tests.sh: what both do first.

# gpu_script_setup SUBDIR ARGS...: sets ROOT (the repository, made the working directory), DRY
# (1 with --dry-run; any other argument prints the usage and exits 64), OUTDIR ($OUT, else
# $ROOT/SUBDIR; created, absolute) and PY ($PYTHON, else python3: the GPU machines' interpreter
# with torch, where there may be no `python`).
gpu_script_setup() {
  local subdir=$1
  shift
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cd "$ROOT" || exit 1
  DRY=0
  if [[ "${1:-}" == "--dry-run" ]]; then
    DRY=1
  elif [[ $# -gt 0 ]]; then
    echo "usage: bash scripts/$(basename "${BASH_SOURCE[1]}") [--dry-run]" >&2
    exit 64
  fi
  OUTDIR="${OUT:-$ROOT/$subdir}"
  mkdir -p "$OUTDIR"
  OUTDIR="$(cd "$OUTDIR" && pwd)"
  PY="${PYTHON:-$(command -v python3 || command -v python)}"
}
