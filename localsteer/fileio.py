"""Writing files whole: a temporary file next to the target, renamed over it when complete, and
only over a regular file; and reading GGUF files with one-line errors."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import OutputError, OutputExistsError


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
    """Checked before any long work: refuse to overwrite an existing output without `force`, to
    replace anything that is not a regular file (a device, a directory, a link, a pipe) even
    with it, and to start when the file could not be written there (the directory is probed with
    a temporary file, which catches read-only and immutable directories and pseudo-filesystems)."""
    path = Path(path)
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a link" if stat.S_ISLNK(mode)
                    else "a device or special file")
            raise OutputError(f"{path} is {kind}, not a regular file: refusing to replace it")
        if not force:
            raise OutputExistsError(f"{path} exists (use --force to overwrite)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the directories in between are made when the file is written
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".localsteer-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file whole: `write(tmp)` fills a temporary file beside `path`, which then replaces
    it; on any failure or interrupt nothing is left behind and `path` is as it was. A failure to
    write (disk full, permissions, a read-only filesystem) is an `OutputError`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise OutputError(f"{path} is not a regular file: refusing to replace it")
        tmp = temp_beside(path)
        write(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`write_atomic` for a UTF-8 text file."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_gguf(path: str | os.PathLike, arch: str, fill: Callable[[Any], None]) -> Path:
    """Write a GGUF file whole (`write_atomic`): `fill(writer)` adds its keys and tensors to a
    `gguf.GGUFWriter`."""
    import gguf

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return write_atomic(path, write)


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


def check_finite_tensors(path: str | os.PathLike, error: type[Exception], kind: str) -> None:
    """`error` unless every float tensor (F32, F16) of a GGUF file is finite."""
    reader, _ = read_gguf(path, error, kind)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise error(f"{path}: {t.name} has NaN or infinite values")


def _field_value(f: Any) -> Any:
    try:
        v = f.contents()
    except Exception:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v
