#!/usr/bin/env bash
# Installs fusedres for development and builds fusedres._C.
#
# torch is installed (pinned to 2.13.0, the CPU wheel on our machines) only when it is missing, so
# an existing CUDA torch on a GPU machine is kept. The extension is built without build isolation
# so that it compiles against the torch in this environment.
set -euo pipefail
cd "$(dirname "$0")/.."
# `python`, else `python3` (the GPU machines have only python3); PYTHON overrides.
PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ -z "$PYTHON" ]]; then
  echo "install.sh: neither python nor python3 is on PATH; set PYTHON=/path/to/python" >&2
  exit 1
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install ninja numpy setuptools wheel
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip install --no-build-isolation -e ".[test,report,triton,finetune,export]"
"$PYTHON" -m fusedres.info
