"""Writing files whole: a temporary file next to the target, renamed over it when complete; and
reading GGUF files with one-line errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import OutputExistsError


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


def add_gguf_value(writer: Any, key: str, value: Any) -> None:
    """Store a metadata value under its natural GGUF type (lists as float arrays)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, (int, np.integer)):
        writer.add_int64(key, int(value))
    elif isinstance(value, (float, np.floating)):
        writer.add_float32(key, float(value))
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        writer.add_array(key, [float(x) for x in value])
    else:
        raise TypeError(f"cannot store {key}={value!r} in GGUF")


def check_output(path: str | os.PathLike, force: bool) -> None:
    """Refuse to overwrite an existing output without `force` (checked before any long work)."""
    if Path(path).exists() and not force:
        raise OutputExistsError(f"{path} exists (use --force to overwrite)")


def write_gguf(path: str | os.PathLike, arch: str, fill: Callable[[Any], None]) -> Path:
    """Write a GGUF file whole: `fill(writer)` adds its keys and tensors to a `gguf.GGUFWriter`
    on a temporary file, which then replaces `path`; on any failure nothing is left behind."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_gguf(path: str | os.PathLike, error: type[Exception], kind: str) -> tuple[Any, dict[str, Any]]:
    """A `gguf.GGUFReader` on `path` and its metadata as plain values; `error("<kind> file not
    found: …")` or `error("… is not a GGUF file …")` when it cannot be read."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise error(f"{kind} file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/OSError/struct errors on junk
        raise error(f"{path} is not a GGUF file ({type(e).__name__}: {e})") from None
    return reader, {name: _field_value(f) for name, f in reader.fields.items()}


def _field_value(f: Any) -> Any:
    try:
        v = f.contents()
    except Exception:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v
