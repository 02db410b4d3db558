"""Writing files whole: a temporary file next to the target, renamed over it when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: str | os.PathLike) -> str:
    """An empty temporary file in the target's directory, with the permissions a plain new file
    would get (mkstemp's are 0600), to be filled and then `os.replace`d onto the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp
