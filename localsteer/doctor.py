"""`localsteer doctor`: is this llama.cpp build usable here, and what does it run on?"""

from __future__ import annotations

import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import LocalsteerError
from .models import DEFAULT_MODEL, resolve
from .runtime import LLAMA_CPP_PYTHON_VERSION, backend_devices, supports_gpu_offload, system_info

REINSTALL = ('CMAKE_ARGS="$(bash scripts/cmake_args.sh)" pip install --force-reinstall --no-cache-dir '
             f'--no-deps llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}')

_SMOKE = """
import sys
from localsteer.runtime import Model
m = Model(sys.argv[1])
c = m.context(n_ctx=256)
c.decode_sequence(m.tokenize("Hello"), 0)
c.logits()
print("ok")
"""


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ok: bool = True


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check(model: str = DEFAULT_MODEL) -> Report:
    r = Report()
    info = system_info()
    devices = backend_devices()
    r.lines += [
        ("localsteer", __version__),
        ("python", f"{platform.python_version()} on {platform.system()} {platform.machine()}"),
        ("llama-cpp-python", LLAMA_CPP_PYTHON_VERSION),
        ("devices", ", ".join(f"{n} ({d})" for n, d in devices) or "none"),
        ("gpu offload", "yes" if supports_gpu_offload() else "no (CPU build)"),
        ("llama.cpp build", info),
    ]
    backend = "CUDA" if any(n.startswith("CUDA") for n, _ in devices) else \
        "Metal" if any(n.startswith(("Metal", "MTL")) for n, _ in devices) else "CPU"
    r.lines.append(("backend", backend))
    flags = cpu_flags()
    if flags:
        has_amx = "amx_tile" in flags
        built = "AMX" in info
        r.lines.append(("cpu AMX", ("yes" if has_amx else "no") +
                        (f"; llama.cpp built {'with' if built else 'without'} its AMX kernels" if has_amx else "")))
        if has_amx and built:
            r.warnings.append(
                "this CPU has AMX and llama.cpp was built with its AMX kernels, which crash at the "
                "first decode (llama.cpp issue 20824). Rebuild without them: " + REINSTALL)
    try:
        path = resolve(model)
    except LocalsteerError as e:
        r.lines.append(("decode test", f"skipped: {e}"))
        return r
    proc = subprocess.run([sys.executable, "-c", _SMOKE, str(path)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 0 and proc.stdout.strip().endswith("ok"):
        r.lines.append(("decode test", f"ok ({path.name})"))
        r.lines.append(("loops (auto)", _calibration(path)))
    else:
        r.ok = False
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        r.lines.append(("decode test", f"FAILED: {how}"))
        r.warnings.append("llama.cpp crashed while decoding. If this CPU has AMX (see above), "
                          "rebuild llama-cpp-python: " + REINSTALL)
    return r


def _calibration(path) -> str:
    """The decode costs behind `--reject-loop auto`, measured afresh (and cached) for the model."""
    from . import calibrate
    from .runtime import Model

    try:
        model = Model(path)
    except LocalsteerError as e:
        return f"not measured: {e}"
    try:
        return "rejection: " + calibrate.costs(model, fresh=True).describe()
    finally:
        model.close()
