"""Interop with llama.cpp's own tools, built from the llama.cpp source vendored in the
llama-cpp-python sdist by scripts/build_llama_cpp.sh (scripts/install.sh --test runs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localsteer import api, models
from localsteer.runtime import LLAMA_CPP_PYTHON_VERSION
from localsteer.vector import ControlVector

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
DATASETS = ROOT / "vectors" / "datasets"


def tool(name: str) -> Path:
    path = models.home() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "bin" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/build_llama_cpp.sh")
    return path


def llama_completion(model: Path, prompt: str, n: int, *extra: str) -> str:
    proc = subprocess.run(
        [str(tool("llama-completion")), "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0",
         "-s", "1", "-no-cnv", "--no-warmup", "--simple-io", "--no-display-prompt", "-lv", "0",
         "-t", "2", *extra], capture_output=True, text=True, errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    # llama-completion ends its output with " [end of text]\n" when it met EOS, then "\n\n"
    end = out.rfind(" [end of text]")
    if end >= 0:
        return out[:end]
    return out[:-2] if out.endswith("\n\n") else out


def localsteer_generate(model: Path, prompt: str, n: int, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "localsteer.cli", "generate", "--model", str(model), "--raw",
                           "--temp", "0", "-n", str(n), "--json", *args, prompt],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json
    return json.loads(proc.stdout)["text"]


@pytest.mark.parametrize("name,layers,scale", [
    ("smollm2-135m-instruct", (8, 20), 4),
    ("qwen2.5-coder-0.5b-instruct", (8, 16), 6),
])
def test_llama_cpp_cli_matches_localsteer_with_our_vector(name, layers, scale, tmp_path):
    path = models.resolve(name)
    model = api.load_model(str(path))
    pairs = api.load_pairs(DATASETS / "uppercase.jsonl")[:12]
    vec = api.extract_vector(model, pairs).vector
    model.close()
    vec.save(tmp_path / "ours.gguf")
    prompt = "<|im_start|>user\nDescribe the ocean in two sentences.<|im_end|>\n<|im_start|>assistant\n"
    a, b = layers
    theirs = llama_completion(path, prompt, 32, "--control-vector-scaled", f"{tmp_path}/ours.gguf:{scale}",
                              "--control-vector-layer-range", str(a), str(b))
    ours = localsteer_generate(path, prompt, 32, "--vector", f"{tmp_path}/ours.gguf:{scale}",
                               "--layers", f"{a}-{b}")
    plain = llama_completion(path, prompt, 32)
    assert ours == theirs
    assert ours != plain  # the vector did something, in both


def test_reads_cvector_generator_output(tmp_path, smol_path):
    pairs = api.load_pairs(DATASETS / "happy-sad.jsonl")[:6]
    model = api.load_model(str(smol_path))
    from localsteer.extract import format_pair
    pos, neg = zip(*(format_pair(model, p) for p in pairs))
    model.close()
    # one prompt per line; llama.cpp expands "\n" escapes itself
    (tmp_path / "pos.txt").write_text("\n".join(p.replace("\n", "\\n") for p in pos) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(p.replace("\n", "\\n") for p in neg) + "\n")
    out = tmp_path / "cvg.gguf"
    proc = subprocess.run([str(tool("llama-cvector-generator")), "-m", str(smol_path),
                           "--positive-file", str(tmp_path / "pos.txt"), "--negative-file",
                           str(tmp_path / "neg.txt"), "--method", "mean", "-o", str(out), "-t", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    v = ControlVector.load(out)
    assert v.arch == "llama" and v.n_embd == 576 and v.layers == tuple(range(1, 30))
    np.testing.assert_allclose(np.linalg.norm(v.directions[1:], axis=1), 1.0, rtol=1e-3)
    prompt = "<|im_start|>user\nTell me about your weekend.<|im_end|>\n<|im_start|>assistant\n"
    theirs = llama_completion(smol_path, prompt, 24, "--control-vector-scaled", f"{out}:4",
                              "--control-vector-layer-range", "10", "20")
    ours = localsteer_generate(smol_path, prompt, 24, "--vector", f"{out}:4", "--layers", "10-20")
    assert ours == theirs
