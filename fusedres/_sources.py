"""The fingerprint of the C++/CUDA sources (csrc/) that fusedres._C is built from.

setup.py's build records it in fusedres/_build_sources.py; fusedres._ext compares the record
with the sources beside the package at import, so that a library left from other sources (a
`git pull` without a rebuild) is refused with the fix, instead of failing later at an op or
function it lacks. Standard library only: setup.py loads this file by path, before torch's build.
"""

from __future__ import annotations

import hashlib
import os

# What the build compiles or includes; editors' backups and swap files beside them are not.
SOURCE_SUFFIXES = (".cpp", ".h", ".hpp", ".cu", ".cuh")
# The record while a build runs, and after it failed: no fingerprint equals it.
UNFINISHED = "build not finished"


def csrc_fingerprint(csrc: str) -> str:
    """SHA-256 (hex) over every source file below ``csrc``: its path relative to ``csrc`` and
    its bytes, in sorted order."""
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(csrc):
        subfolders.sort()  # os.walk descends in this list's order
        for name in sorted(files):
            if not name.endswith(SOURCE_SUFFIXES):
                continue
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()
