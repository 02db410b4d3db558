"""The wheel works outside the checkout: built from this tree, installed into a fresh venv in a
temporary directory, it finds its shipped vectors and datasets as package data (by short name),
lists the models, generates and runs the chat (in tmux) — nothing resolved against the source.

The fresh venv gets the heavy dependencies (llama-cpp-python, built for this machine; numpy;
gguf; click; textual) from this environment through a path file: rebuilding llama.cpp would take
ten minutes. That directory's own path files are not read, so its editable install of localsteer
stays out of the way; the test checks that localsteer is imported from the fresh venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", ROOT)
    (wheel,) = (tmp / "dist").glob("localsteer-*.whl")
    env = tmp / "venv"
    run(sys.executable, "-m", "venv", env)
    py = env / "bin" / "python"
    purelib = Path(run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (purelib / "_localsteer_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    return env


def test_the_wheel_carries_its_data_and_imports_from_the_venv(venv, tmp_path):
    out = run(venv / "bin" / "python", "-c", "import json, localsteer, localsteer_vectors, localsteer.shipped as s; "
              "print(json.dumps([localsteer.__file__, localsteer_vectors.__file__, str(s.datasets())]))",
              cwd=tmp_path).stdout
    for path in json.loads(out):
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    data = Path(json.loads(out)[1]).parent
    assert (data / "smollm2-135m-instruct" / "happy-sad.gguf").is_file()
    assert (data / "datasets" / "refusal" / "harmful.jsonl").is_file()
    assert not list(data.glob("*/refusal/inlp-*.gguf"))  # rebuilt by `refusal direction`, not shipped


def test_installed_commands_work_anywhere(venv, tmp_path):
    ls = venv / "bin" / "localsteer"
    assert "smollm2-135m-instruct" in run(ls, "models", "list", cwd=tmp_path).stdout
    gen = json.loads(run(ls, "generate", "--temp", 0, "-n", 8, "--json", "-v", "happy-sad:2", "How was your weekend?",
                         cwd=tmp_path).stdout)
    assert gen["n_tokens"] == 8 and gen["steering"] == "2 x happy-sad.gguf on layers 7-24"
    # the shipped refusal datasets are the probe's defaults: their paths are inside the venv
    assert str(venv) in "".join(run(ls, "probe", "train", "--help", cwd=tmp_path).stdout.split())


def test_installed_chat_runs(venv):
    screen = run("bash", ROOT / "scripts" / "tui_demo.sh", "--vector", "happy-sad:2", "--threads", "1",
                 env={**os.environ, "LOCALSTEER": str(venv / "bin" / "localsteer")}).stdout
    assert "happy-sad" in screen and "tok/s" in screen
