"""The command line, run as a user runs it (a real process, the real model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DATASETS = ROOT / "vectors" / "datasets"


def ls(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "localsteer.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"localsteer {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def fails(*args) -> str:
    """Run a command that must fail with a one-line error and exit status 1, no traceback."""
    proc = ls(*args, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory, smol_path):
    out = tmp_path_factory.mktemp("v") / "lc.gguf"
    # a small dataset keeps this quick
    data = out.parent / "small.jsonl"
    data.write_text("".join((DATASETS / "lowercase.jsonl").read_text().splitlines(True)[:8]))
    proc = ls("extract", "--model", smol_path, "--dataset", data, "--out", out)
    assert "wrote" in proc.stdout and "norms:" in proc.stdout and "pairs/s" in proc.stdout
    return out


def test_models_list():
    out = ls("models", "list").stdout
    for name in ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
                 "gemma-3-270m"]:
        assert name in out
    assert "present" in out


def test_inspect_shows_what_a_shipped_vector_was_measured_to_do():
    out = ls("inspect", ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct" / "lowercase.gguf").stdout
    assert "method:           rewrite-lower" in out
    assert "measured:         eval grid" in out and "92% of replies follow 'lowercase'" in out


def test_inspect(vector_file):
    out = ls("inspect", vector_file).stdout
    assert "arch hint:        llama" in out and "n_embd:           576" in out
    assert "method:           mean" in out and "dataset:          small.jsonl" in out
    assert "norms: 1:" in out


def test_generate_json(vector_file):
    out = ls("generate", "--vector", f"{vector_file}:3", "--layers", "8-16", "--temp", "0", "-n", "12",
             "--json", "--events", "Describe the ocean.").stdout
    obj = json.loads(out)
    assert obj["n_tokens"] == len(obj["tokens"]) == len(obj["events"]) <= 12
    assert obj["tokens_per_second"] > 0 and obj["layers"] == "8-16"
    assert obj["events"][0]["status"] == "steered"


def test_generate_directer_with_a_vector():
    obj = json.loads(ls("generate", "--instruction", "Answer in French.", "-v", "happy-sad:4", "--layers", "8-16",
                        "--temp", "0", "-n", "8", "--json", "--events", "Describe the ocean.").stdout)
    assert obj["n_tokens"] == len(obj["events"]) <= 8
    steering = obj["steering"]
    assert steering.startswith("DIRECTER x100 on 'Answer in French.'") and "happy-sad.gguf on layers 8-16" in steering
    assert obj["vectors"][0]["scale"] == 4 and set(obj["directer"]["tokens"]) == {"skipped", "steered", "weakened", "plain"}


def test_generate_streams_text_and_greedy_is_deterministic():
    a = ls("generate", "--temp", "0", "-n", "16", "What is the capital of France?")
    b = ls("generate", "--temp", "0", "-n", "16", "What is the capital of France?")
    assert a.stdout == b.stdout and "Paris" in a.stdout
    assert "tok/s" in a.stderr


def test_export_bakes_and_prints_flags(vector_file, tmp_path):
    out = tmp_path / "baked.gguf"
    proc = ls("export", f"{vector_file}:2", "--scale", "2", "--layers", "8-16", "--out", out)
    assert "--control-vector" in proc.stdout and out.is_file()
    info = ls("inspect", out).stdout
    assert "layers:           8-16 of 30" in info


def test_doctor_reports_build_and_decodes():
    proc = ls("doctor")
    assert "llama-cpp-python: 0.3.36" in proc.stdout
    assert "decode test:      ok" in proc.stdout
    assert "backend:" in proc.stdout
    assert "loops (auto):     rejection: a decode of 2 rows costs" in proc.stdout and "DIRECTER: both rows" in proc.stdout


# --- bad input: one line, exit 1, nothing written ----------------------------------------------

def test_missing_and_non_gguf_model(tmp_path):
    assert "model file not found" in fails("generate", "--model", tmp_path / "none.gguf", "hi")
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    assert "not a GGUF file" in fails("generate", "--model", junk, "hi")
    assert "unknown model" in fails("generate", "--model", "no-such-model", "hi")


def test_vector_for_another_model(tmp_path):
    import numpy as np
    from localsteer.vector import ControlVector
    ControlVector(np.ones((24, 896), dtype=np.float32), "qwen2").save(tmp_path / "q.gguf")
    msg = fails("generate", "--vector", tmp_path / "q.gguf", "hi")
    assert "n_embd=896" in msg and "576" in msg


def test_bad_vector_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("nope")
    assert "not a GGUF file" in fails("inspect", bad)
    assert "not found" in fails("inspect", tmp_path / "none.gguf")


def test_empty_and_malformed_datasets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "o.gguf"
    assert "has no pairs" in fails("extract", "--dataset", empty, "--out", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a", "negative": "b"}\n{"positive": "a", \n')
    assert "bad.jsonl:2: not valid JSON" in fails("extract", "--dataset", bad, "--out", out)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"positive": "a", "negative": ""}\n')
    assert "wrong.jsonl:1: 'negative' must be a non-empty string" in fails("extract", "--dataset", wrong, "--out", out)
    assert "dataset not found" in fails("extract", "--dataset", tmp_path / "none.jsonl", "--out", out)
    assert not out.exists()


def test_unknown_layer_range(vector_file):
    assert "outside the model: steerable layers are 1-29" in fails(
        "generate", "--vector", vector_file, "--layers", "20-40", "hi")
    assert "bad layer range" in fails("generate", "--vector", vector_file, "--layers", "eight", "hi")


def test_existing_output_needs_force(vector_file, tmp_path):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    assert "exists (use --force" in fails("extract", "--dataset", DATASETS / "lowercase.jsonl", "--out", out)
    assert "exists (use --force" in fails("export", vector_file, "--out", out)
    assert out.read_bytes() == b"keep me"
    ls("export", vector_file, "--out", out, "--force")
    assert out.read_bytes().startswith(b"GGUF")
