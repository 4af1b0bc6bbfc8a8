"""The C++ sources a checkout's pyoptim._C is compiled from, and their fingerprint.

setup.py records the fingerprint in pyoptim/_build_info.py when it builds the library (it loads this file by
its path: no import of the package, which would load the library); pyoptim._backends compares it with the
checkout's sources before it loads the library (note [stale library]). Standard library only.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

# What goes into the library: everything under csrc/ that the compiler reads.
SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def checkout_csrc(package_dir: str) -> Optional[str]:
    """csrc/ of the source checkout that holds the package directory `package_dir` (an in-place or editable
    build), or None for an installed package (a wheel carries no sources: its library came with its Python)."""
    root = os.path.dirname(os.path.abspath(package_dir))
    csrc = os.path.join(root, "csrc")
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(csrc):
        return csrc
    return None


def source_files(csrc: str) -> list[str]:
    """The compiled sources under `csrc`, as sorted paths relative to it."""
    out = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(csrc, rel)) as it:
            for entry in it:
                name = os.path.join(rel, entry.name) if rel else entry.name
                if entry.is_dir():
                    stack.append(name)
                elif entry.name.endswith(SUFFIXES):
                    out.append(name)
    return sorted(out)


def newest_mtime(csrc: str, files: list[str]) -> float:
    """The latest modification time among `files` (0.0 for none)."""
    return max((os.stat(os.path.join(csrc, f)).st_mtime for f in files), default=0.0)


def fingerprint(csrc: str, files: Optional[list[str]] = None) -> str:
    """sha256 over the names and contents of the compiled sources under `csrc`: equal for the same sources,
    whatever their modification times."""
    h = hashlib.sha256()
    for rel in source_files(csrc) if files is None else files:
        with open(os.path.join(csrc, rel), "rb") as f:
            data = f.read()
        h.update(rel.replace(os.sep, "/").encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()
