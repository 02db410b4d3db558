"""Every command that reads or edits a model's insides, on each architecture llama.cpp runs that
people steer: tiny synthetic models (tests/tiny_models.py: llama, qwen2, qwen3, gemma2, gemma3,
phi3, qwen2moe and llama with experts), and the real Gemma-3-270m base model, through the real
llama.cpp. Each test records what it saw (✓, or why the command is refused there) and the last
test compares that with the table in README.md ("Architectures"); LOCALSTEER_UPDATE_DOCS=1
rewrites the table from the outcomes of the run.

Random weights write gibberish: the tests compare tokens (scale 0 is plain decoding token for
token, a strong vector changes the text, every rejection loop makes the token-by-token loop's
choices, localsteer and llama-completion write the same greedy text), never the quality of text.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from test_directer import key_scaled_rows
from test_interop import llama_completion, localsteer_generate
from tiny_models import TINY

from localsteer import api
from localsteer import refusal as rf
from localsteer.dataset import load_split_prompts
from localsteer.directer import Directer, find_span
from localsteer.refusal.lora import adapter_directions, orthonormal
from localsteer.runtime import Capture, KeyScale, Lora, Model, supports_gpu_offload
from localsteer.steer import Rejection, Status, Steerer
from localsteer.vector import ControlVector

ROOT = Path(__file__).parent.parent
DATASETS = ROOT / "vectors" / "datasets"
REFUSAL = DATASETS / "refusal"
README = ROOT / "README.md"
ARCHS = list(TINY)
GREEDY = api.sampling_config(temperature=0)
PROMPT = "Describe the ocean in French."
PAIRS = api.load_pairs(DATASETS / "happy-sad.jsonl")[:8]
ON_GPU = supports_gpu_offload()

# --- the table ----------------------------------------------------------------------------------

COLUMNS = {
    "extract": "`extract` mean, pca",
    "generate": "`generate -v`",
    "rejection": "rejection: drafted, joint",
    "directer": "DIRECTER `--instruction`",
    "interop": "`export` → `llama-completion`",
    "probe": "`probe train`",
    "refusal": "`refusal direction` (ablation adapter → `--lora`)",
    "kts": "`kts train`",
}
REAL = "gemma-3-270m"
OUTCOMES: dict[tuple[str, str], str] = {}  # (row, column) -> cell, filled by the tests as they pass
START = "<!-- architectures: the table tests/test_architectures.py measured (LOCALSTEER_UPDATE_DOCS=1 rewrites it) -->"
END = "<!-- /architectures -->"


def row_label(row: str) -> str:
    if row == REAL:
        return "`gemma3`: the real Gemma-3-270m (base model, no chat template)"
    t = TINY[row]
    return f"`{t.arch}`{' with experts' if t.arch == 'llama' and t.n_expert else ''}: {t.stands_for}"


def record(row: str, column: str, cell: str = "✓") -> None:
    OUTCOMES[(row, column)] = cell


def refused(proc: subprocess.CompletedProcess, *reasons: str) -> str:
    """The one-line error of a refused command (after any progress lines), checked to name every
    reason."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == lines[-1:] and errors[0].startswith("Error: "), proc.stderr[-2000:]
    for reason in reasons:
        assert reason in errors[0], (reason, errors[0])
    return errors[0]


def completion(model: Path, prompt: str, n: int, *extra: str) -> str:
    """llama-completion's greedy text (test_interop), on $LOCALSTEER_THREADS threads if set (its
    threads spin: more of them than free cores is slow)."""
    threads = os.environ.get("LOCALSTEER_THREADS", "")
    return llama_completion(model, prompt, n, *extra, *(["-t", threads] if threads.isdigit() else []))


def cli(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localsteer.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


# --- the tiny models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_paths(smol_path, qwen05_path):
    """Every tiny model, made in the model cache if missing (their tokenizers come from these two)."""
    return {name: tiny_models.ensure(name) for name in ARCHS}


@pytest.fixture(scope="module")
def tiny(tiny_paths):
    loaded: dict[str, Model] = {}

    def get(name: str) -> Model:
        if name not in loaded:
            loaded[name] = Model(tiny_paths[name])
        return loaded[name]

    yield get
    for m in loaded.values():
        m.close()


@pytest.fixture(scope="module")
def vectors(tiny, tmp_path_factory):
    """A happy-sad mean vector per tiny model, saved (path, vector)."""
    made: dict[str, tuple[Path, ControlVector]] = {}
    folder = tmp_path_factory.mktemp("vectors")

    def get(name: str) -> tuple[Path, ControlVector]:
        if name not in made:
            v = api.extract_vector(tiny(name), PAIRS).vector
            made[name] = (v.save(folder / f"{name}.gguf"), v)
        return made[name]

    return get


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory) -> Path:
    """The refusal datasets cut to 6 prompts per split and side: enough for every step."""
    folder = tmp_path_factory.mktemp("refusal-small")
    for side in ("harmful", "harmless"):
        rows = [json.loads(line) for line in (REFUSAL / f"{side}.jsonl").read_text().splitlines() if line.strip()]
        keep = [r for s in ("train", "validation", "test") for r in [r for r in rows if r["split"] == s][:6]]
        (folder / f"{side}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return folder


@pytest.mark.parametrize("name", ARCHS)
def test_llama_cpp_loads_the_tiny_model(name, tiny):
    spec, m = TINY[name], tiny(name)
    assert (m.arch, m.n_layer, m.n_embd) == (spec.arch, spec.n_layer, spec.n_embd)
    assert m.metadata(f"{spec.arch}.expert_count") == (str(spec.n_expert) if spec.n_expert else None)
    assert m.chat_template() and "<|im_start|>" in m.apply_chat_template([{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("name", ARCHS)
def test_extract_has_the_models_layers_and_width(name, tiny, tmp_path):
    m = tiny(name)
    for method in ("mean", "pca"):
        v = api.extract_vector(m, PAIRS, method=method).vector
        assert v.directions.shape == (m.n_layer, m.n_embd) and v.arch == m.arch
        assert v.suggested_layers == tuple(api.suggested_layers(m.n_layer))
        assert not v.directions[0].any() and (v.norms()[1:] > 0).all() and np.isfinite(v.directions).all()
        back = ControlVector.load(v.save(tmp_path / f"{method}.gguf"))
        np.testing.assert_array_equal(back.directions, v.directions)
    record(name, "extract")


def tokens(steerer: Steerer, m: Model, n: int = 24, prompt: str = PROMPT, fast: bool = True):
    return [e.token for e in steerer.generate(api.chat_prompt(m, prompt), n, GREEDY, fast=fast)]


@pytest.mark.parametrize("name", ARCHS)
def test_generate_with_a_vector(name, tiny, vectors):
    m, (_, v) = tiny(name), vectors(name)
    layers = list(v.suggested_layers)
    plain = tokens(Steerer(m), m)
    assert tokens(Steerer(m, v.only_layers(layers) * 0.0, layers), m) == plain  # the vector's path, adding zeros
    assert tokens(Steerer(m, v.only_layers(layers) * 16.0, layers), m) != plain
    record(name, "generate")


def events(steerer: Steerer, m: Model, fast: bool = True):
    return [(e.token, e.status, e.rounds, e.layers)
            for e in steerer.generate(api.chat_prompt(m, PROMPT), 24, GREEDY, fast=fast)]


@pytest.mark.parametrize("name", ARCHS)
def test_rejection_loops_make_the_token_by_token_choices(name, tiny, vectors):
    m, (_, v) = tiny(name), vectors(name)
    layers = list(v.suggested_layers)
    loops = ["drafted"] if ON_GPU else ["drafted", "joint"]  # GPU kernels are not batch invariant
    statuses = set()
    for scale in (4.0, 16.0):
        steerers = {loop: Steerer(m, v.only_layers(layers) * scale, layers, Rejection(topk=5, loop=loop),
                                  importance=layers) for loop in loops}
        reference = events(steerers["drafted"], m, fast=False)
        for loop, st in steerers.items():
            assert events(st, m) == reference, (loop, scale)
        statuses |= {status for _, status, _, _ in reference}
    assert Status.STEERED in statuses and statuses & {Status.WEAKENED, Status.PLAIN}, statuses
    record(name, "rejection")


@pytest.mark.parametrize("name", ARCHS)
def test_directer_scales_the_keys_of_every_layer(name, tiny):
    m = tiny(name)
    full = m.apply_chat_template([{"role": "user", "content": PROMPT}])
    toks = m.tokenize(full)
    start, end = find_span(m, toks, full, "in French")
    scale = KeyScale()
    seen: set[int] = set()
    on_tensor = scale.on_tensor
    scale.on_tensor = lambda tensor, il: (seen.add(il), on_tensor(tensor, il))[1]
    (plain1, steered1), (plain100, steered100) = key_scaled_rows(m, toks, start, end, (1.0, 100.0), scale)
    assert seen == set(range(m.n_layer))  # every layer's attention scores (kq-<il>) went through it
    np.testing.assert_array_equal(plain1, steered1)  # alpha 1: no steering
    np.testing.assert_array_equal(plain1, plain100)  # the plain row never sees it
    assert np.abs(steered100 - plain100).max() > 1.0
    settings = Directer()
    out = api.generate_directer(m, PROMPT, mark="in French", settings=settings, sampling=GREEDY, max_tokens=24)
    for e in out.events:  # each token passes the test its status claims
        top = e.plain_top[0][2]
        if e.status in (Status.STEERED, Status.WEAKENED):
            assert e.plain_prob > settings.p * top
        else:
            assert e.token == e.plain_top[0][0]
    record(name, "directer")


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_exported_vector_in_llama_completion_matches_localsteer(name, tiny, tiny_paths, vectors, tmp_path):
    m, path, (vec_path, v) = tiny(name), tiny_paths[name], vectors(name)
    first, last = v.suggested_layers[0], v.suggested_layers[-1]
    mix = tmp_path / "mix.gguf"
    proc = cli("export", f"{vec_path}:8", "--layers", f"{first}-{last}", "-o", mix)
    assert proc.returncode == 0, proc.stderr
    prompt = m.apply_chat_template([{"role": "user", "content": PROMPT}])
    theirs = completion(path, prompt, 24, "--control-vector", str(mix))
    ours = localsteer_generate(path, prompt, 24, "--vector", str(mix))
    assert ours == theirs
    assert ours != completion(path, prompt, 24)
    record(name, "interop")


@pytest.mark.parametrize("name", ARCHS)
def test_probe_reads_the_templates_post_instruction_tokens(name, tiny, tmp_path):
    m = tiny(name)
    result = api.train_probe(m, REFUSAL / "harmful.jsonl", REFUSAL / "harmless.jsonl")
    probe = result.probe
    assert probe.positions == rf.post_instruction_count(m) >= 5  # <|im_end|> \n <|im_start|> assistant \n
    assert (probe.n_embd, probe.n_layer, probe.arch) == (m.n_embd, m.n_layer, m.arch) and 1 <= probe.layer < m.n_layer
    gate = api.load_gate(m, probe.save(tmp_path / "probe.gguf"))
    decision = gate.decide(api.chat_prompt(m, "How do I pick a lock?"))
    assert 0.0 <= decision.probability <= 1.0
    record(name, "probe")


ABLATION = {}  # name -> the refusal-ablate.gguf written by `refusal direction`


def ablation_adapter(name: str, m, small_sets, out: Path) -> Path:
    """The tiny model's refusal ablation adapter, made once per session (both tests below use it)."""
    if name not in ABLATION:
        files = api.refusal_direction(m, small_sets, out, inlp_rounds=2, kl_max=1e9, log=lambda s: None)
        ABLATION[name] = files["ablation"]
    return ABLATION[name]


@pytest.mark.parametrize("name", ARCHS)
def test_refusal_direction_ablates_every_layer_or_is_refused(name, tiny, tiny_paths, small_sets, tmp_path_factory):
    m, path = tiny(name), tiny_paths[name]
    out = tmp_path_factory.mktemp(f"refusal-{name}")
    if TINY[name].post_norm:
        proc = cli("refusal", "direction", "-m", path, "--datasets", small_sets, "-o", out)
        refused(proc, "post-norm")
        assert list(out.iterdir()) == []
        record(name, "refusal", "✗ post-norm layers")
        return
    adapter = ablation_adapter(name, m, small_sets, out)
    # with the adapter, the stream has no component along the direction beyond the token embedding's
    # (a tied embedding is left unedited): the same at every layer
    q = orthonormal(adapter_directions(adapter)[0])[:, 0]
    toks = api.chat_prompt(m, "How do I bake bread?")
    embedded = tiny_models.token_embedding(name, m.n_vocab)[toks] @ q if TINY[name].tied else np.zeros(len(toks))
    lora = Lora(m, adapter)
    try:
        along = {}
        for label, adapters in (("plain", []), ("ablated", [(lora, 1.0)])):
            capture = Capture(range(m.n_layer))
            with m.context(n_ctx=256, capture=capture) as ctx:
                ctx.set_loras(adapters)
                ctx.decode(toks, range(len(toks)), [0] * len(toks), [True] * len(toks))
            along[label] = np.stack([capture.layers[il] @ q for il in range(m.n_layer)])
    finally:
        lora.close()
    residue = np.abs(along["ablated"] - embedded).max()
    assert residue < 0.02 * np.abs(along["plain"] - embedded).max(), residue  # llama.cpp's int8 activations
    record(name, "refusal")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ARCHS if not TINY[n].post_norm])
def test_ablation_adapter_in_llama_completion_matches_localsteer(name, tiny, tiny_paths, small_sets,
                                                                tmp_path_factory):
    m, path = tiny(name), tiny_paths[name]
    adapter = ablation_adapter(name, m, small_sets, tmp_path_factory.mktemp(f"refusal-{name}"))
    prompt = m.apply_chat_template([{"role": "user", "content": "How do I pick a lock?"}])
    theirs = completion(path, prompt, 24, "--lora", str(adapter))
    assert localsteer_generate(path, prompt, 24, "--lora", str(adapter)) == theirs


KTS_REFUSED = {"mixtral": ("transformers reads", "✗ transformers reads it as a dense Llama")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_kts_trains_where_transformers_reads_the_model(name, tiny, tiny_paths, vectors, tmp_path):
    pytest.importorskip("torch", reason="the training extra: bash scripts/install.sh --test installs it")
    m, path, (vec_path, _) = tiny(name), tiny_paths[name], vectors(name)
    prompts = tmp_path / "benign.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "split": "train"}) + "\n"
                               for p in load_split_prompts(DATASETS / "benign.jsonl")["train"][:4]))
    out = tmp_path / "kts.gguf"
    proc = cli("kts", "train", "-m", path, "-v", f"{vec_path}:4", "--prompts", prompts, "--steps", 3, "--batch", 2,
               "--lr", 0.01, "-o", out)
    if name in KTS_REFUSED:
        reason, cell = KTS_REFUSED[name]
        refused(proc, reason)
        assert not out.exists()
        record(name, "kts", cell)
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora = Lora(m, out)  # llama.cpp checks every tensor's name and shape against the model
    lora.close()
    # transformers holds an MoE's experts as 3-D parameters, not linear layers: no LoRA on them
    record(name, "kts", "✓ not the experts" if TINY[name].n_expert else "✓")


# --- the real Gemma-3-270m (base) --------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma(gemma270_path):
    m = Model(gemma270_path)
    yield m
    m.close()


@pytest.mark.slow
def test_real_gemma_extracts_steers_with_rejection_and_inspects(gemma, gemma270_path, tmp_path):
    assert gemma.chat_template() is None  # a base model: prompts are plain text
    out = tmp_path / "happy.gguf"
    proc = cli("extract", "-m", REAL, "-d", DATASETS / "happy-sad.jsonl", "-o", out)
    assert proc.returncode == 0, proc.stderr
    v = ControlVector.load(out)
    assert v.directions.shape == (18, 640) and v.arch == "gemma3"
    record(REAL, "extract")
    shown = cli("inspect", out).stdout
    assert "arch hint:        gemma3" in shown and "layers:           1-17 of 18" in shown
    layers = list(v.suggested_layers)
    prompt = "My weekend was"
    plain = [e.token for e in Steerer(gemma).generate(gemma.tokenize(prompt), 24, GREEDY)]
    steered = [e.token for e in Steerer(gemma, v.only_layers(layers) * 4.0, layers).generate(
        gemma.tokenize(prompt), 24, GREEDY)]
    assert steered != plain
    record(REAL, "generate")
    # drafted: the token-by-token loop's choices by construction; joint: the same up to near-ties
    # where Q4_K's repacked kernels are not batch invariant (docs/methods.md, "Identical choices")
    st = {loop: Steerer(gemma, v.only_layers(layers) * 8.0, layers, Rejection(topk=20, loop=loop), importance=layers)
          for loop in ("drafted", "joint")}
    reference = [(e.token, e.status) for e in st["drafted"].generate(gemma.tokenize(prompt), 24, GREEDY, fast=False)]
    assert [(e.token, e.status) for e in st["drafted"].generate(gemma.tokenize(prompt), 24, GREEDY)] == reference
    joint = [(e.token, e.status) for e in st["joint"].generate(gemma.tokenize(prompt), 24, GREEDY)]
    assert len(joint) == len(reference) and joint[0] == reference[0]
    assert {s for _, s in reference} & {Status.WEAKENED, Status.PLAIN}  # strong enough to be rejected
    record(REAL, "rejection")
    prompt_text = "The ocean is"
    theirs = completion(gemma270_path, prompt_text, 24, "--control-vector-scaled", f"{out}:4",
                              "--control-vector-layer-range", str(layers[0]), str(layers[-1]))
    assert localsteer_generate(gemma270_path, prompt_text, 24, "--vector", f"{out}:4") == theirs
    record(REAL, "interop")


@pytest.mark.slow
def test_real_gemma_directer_and_probe(gemma, small_sets):
    out = api.generate_directer(gemma, "Describe the ocean in French.", mark="in French", sampling=GREEDY,
                                max_tokens=16)
    assert len(out.tokens) > 0
    record(REAL, "directer")
    result = api.train_probe(gemma, small_sets / "harmful.jsonl", small_sets / "harmless.jsonl")
    assert result.probe.positions == 1  # no template: the prompt's last token
    record(REAL, "probe", "✓ last prompt token")


@pytest.mark.slow
def test_real_gemma_refusal_direction_is_refused_with_both_reasons(tmp_path):
    proc = cli("refusal", "direction", "-m", REAL, "-o", tmp_path / "out")
    refused(proc, "no chat template", "post-norm")
    assert not (tmp_path / "out").exists()
    record(REAL, "refusal", "✗ base model; post-norm layers")


# --- the README's table -------------------------------------------------------------------------

def render(cells: dict[tuple[str, str], str]) -> str:
    rows = [*ARCHS, REAL]
    lines = ["| architecture (models) | " + " | ".join(COLUMNS.values()) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append(f"| {row_label(row)} | " + " | ".join(cells.get((row, c), "–") for c in COLUMNS) + " |")
    return "\n".join(lines)


def readme_cells(block: str) -> dict[tuple[str, str], str]:
    """The cells of the README's table, by (row, column) key."""
    by_label = {row_label(r): r for r in [*ARCHS, REAL]}
    cells = {}
    for line in block.splitlines()[2:]:
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        row = by_label.get(parts[0])
        if row is not None:
            cells.update({(row, c): cell for c, cell in zip(COLUMNS, parts[1:]) if cell != "–"})
    return cells


def test_readme_table_is_what_the_tests_measured():
    if not OUTCOMES:
        pytest.skip("no architecture test ran in this session")
    text = README.read_text()
    match = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    assert match, f"README.md has no architecture table between {START!r} and {END!r}"
    # cells this run did not measure (a selection of tests) keep what the README says
    want = render({**readme_cells(match.group(1)), **OUTCOMES}) + "\n"
    if os.environ.get("LOCALSTEER_UPDATE_DOCS") == "1":
        README.write_text(text[:match.start(1)] + want + text[match.end(1):])
        return
    assert match.group(1) == want, ("README.md's architecture table is not what the tests measured; "
                                    "LOCALSTEER_UPDATE_DOCS=1 rewrites it:\n" + want)
