#!/usr/bin/env bash
# The README's test command against another torch release of the declared range: a venv of its
# own, a copy of the tree (tracked and untracked-but-not-ignored files, as CI's leg 2 copies it),
# the extension built there against that torch by scripts/install.sh, as a user's build is.
# CI runs torch 2.13.0 and 2.14.1, the releases this kind of machine has on disk; the lent GPU
# machines have 2.11 (with torchvision 0.26), which this runs. PyPI's Linux torch wheels carry
# CUDA and its libraries (about 5 GB to download); where nvcc is found the build compiles the
# CUDA kernels too.
#
#   bash scripts/test_torch_release.sh 2.11.0 torchvision==0.26.0
#
# Arguments: the torch version, then any more pip requirements for the venv. The venv is kept
# (FUSEDRES_RELEASE_DIR, default /tmp/fusedres_torch_<version>) for a second run; the copy is
# made anew each time.
# Where pip's configuration caps torch below the release asked for (a constraints file, as on
# machines that keep their releases on disk), PIP_CONFIG_FILE=/dev/null lifts it for this run.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/test_torch_release.sh TORCH_VERSION [pip requirement...]}
shift
work=${FUSEDRES_RELEASE_DIR:-/tmp/fusedres_torch_$version}
python=$(command -v python || command -v python3)
mkdir -p "$work"
[[ -x "$work/venv/bin/python" ]] || "$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "torch==$version" "$@"
rm -rf "$work/src"
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard --deduplicate |
  tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$work/src"
cd "$work/src"
export PATH="$work/venv/bin:$PATH"
bash scripts/install.sh
python -m pytest tests -q -n auto --dist loadgroup -p no:cacheprovider
