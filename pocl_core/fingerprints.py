"""Content fingerprints of input files and folders (16 hex digits of sha256), for provenance checks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

BLOCK = 1 << 22  # read 4 MiB at a time


def hash_files(files: Iterable[Path], root: Path) -> str:
    """sha256 over each file's path relative to ``root`` and its bytes, in the order given."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(BLOCK), b""):
                h.update(block)
    return h.hexdigest()[:16]


def path_fingerprint(path: str | Path) -> str:
    """Fingerprint of a file's bytes, or of every file under a folder (names and bytes, sorted).

    Raises FileNotFoundError when ``path`` does not exist.
    """
    p = Path(path)
    if p.is_file():
        return hash_files([p], p.parent)
    if p.is_dir():
        return hash_files(sorted(f for f in p.rglob("*") if f.is_file()), p)
    raise FileNotFoundError(f"{p}: no such file or folder")
