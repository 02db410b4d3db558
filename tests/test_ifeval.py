"""IFEval: the shipped prompts, scoring through if-verifiable, the summary and the stratified sample
(no model). The scorer tests are skipped, with the reason, where if-verifiable is not installed."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter

import pytest

from localsteer.errors import DatasetError
from localsteer.eval import ifeval

pytestmark = pytest.mark.nomodel  # no model, no llama.cpp: `pytest -m nomodel` runs these in seconds

SHA256 = "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"  # google-research, as published

try:
    import if_verifiable  # noqa: F401
    NO_SCORER = ""
except ImportError as e:
    NO_SCORER = f"if-verifiable is not installed ({e}); pip install 'localsteer[ifeval]'"
needs_scorer = pytest.mark.skipif(bool(NO_SCORER), reason=NO_SCORER)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return ifeval.load_prompts()


def by_key(rows: list[dict], key: int) -> dict:
    (row,) = [r for r in rows if r["key"] == key]
    return row


def row(ids: list[str], kwargs: list[dict], prompt: str = "A request.") -> dict:
    return {"key": 0, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


LOWER = "the weather today is sunny and warm, so we will walk to the park after lunch and eat ice cream."


# --- the shipped file ---------------------------------------------------------------------------

def test_shipped_file_is_the_published_one():
    path = ifeval.default_path()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256 == ifeval.SHA256
    lines = data.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 541 == ifeval.N_PROMPTS  # 541 lines, each ended by "\n"
    for line in lines[:-1]:
        assert set(json.loads(line)) == {"key", "prompt", "instruction_id_list", "kwargs"}


def test_load_prompts(rows):
    assert len(rows) == 541
    assert len({r["key"] for r in rows}) == 541
    assert sum(len(r["instruction_id_list"]) for r in rows) == 834  # IFEval's instruction count
    assert len({i for r in rows for i in r["instruction_id_list"]}) == 25
    assert rows[0]["key"] == 1000 and rows[-1]["key"] == 3757  # file order
    assert all(len(r["kwargs"]) == len(r["instruction_id_list"]) for r in rows)


def test_load_prompts_rejects_malformed_files(tmp_path):
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert ifeval.load_prompts(path) == [good]
    for bad in ({**good, "kwargs": []}, {**good, "instruction_id_list": []}, {**good, "prompt": " "}, [1]):
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
        with pytest.raises(DatasetError, match=r"p\.jsonl:2"):
            ifeval.load_prompts(path)
    with pytest.raises(DatasetError):
        ifeval.load_prompts(tmp_path / "missing.jsonl")


# --- scoring ------------------------------------------------------------------------------------

@needs_scorer
def test_every_prompt_scores(rows):
    scored = [ifeval.score(r, "ok") for r in rows]
    for r, s in zip(rows, scored):
        assert set(s) == {"strict", "loose"}
        assert len(s["strict"]) == len(s["loose"]) == len(r["instruction_id_list"])
        assert all(type(b) is bool for b in s["strict"] + s["loose"])
        assert all(lo for st, lo in zip(s["strict"], s["loose"]) if st)  # the response itself is a loose variant
    result = ifeval.summary(scored)
    assert result["n_prompts"] == 541 and result["n_instructions"] == 834
    assert 0 < result["prompt_strict"] < 0.5  # "ok" has no comma and no capital, and follows little else
    assert [ifeval.score(r, "ok") for r in rows[:40]] == scored[:40]  # deterministic (langdetect is seeded)


@needs_scorer
def test_blank_response_follows_nothing(rows):
    for response in ("", "  \n "):
        s = ifeval.score(by_key(rows, 1001), response)  # punctuation:no_comma: a blank reply has no comma
        assert s == {"strict": [False], "loose": [False]}


@needs_scorer
def test_lowercase(rows):
    r = by_key(rows, 1051)  # "Write a letter to a friend in all lowercase letters ..."
    assert r["instruction_id_list"] == ["change_case:english_lowercase"]
    assert ifeval.score(r, LOWER) == {"strict": [True], "loose": [True]}
    assert ifeval.score(r, LOWER.capitalize()) == {"strict": [False], "loose": [False]}
    assert ifeval.score(r, LOWER.upper()) == {"strict": [False], "loose": [False]}


@needs_scorer
def test_no_commas(rows):
    r = by_key(rows, 1001)
    assert r["instruction_id_list"] == ["punctuation:no_comma"]
    assert ifeval.score(r, "Hark thou shalt see Kyoto at dawn and Nara at dusk.")["strict"] == [True]
    assert ifeval.score(r, "Hark, thou shalt see Kyoto.") == {"strict": [False], "loose": [False]}


@needs_scorer
def test_several_instructions_are_scored_in_order(rows):
    r = by_key(rows, 1069)  # keywords:existence (correlated, experiencing), number_words >= 500, no_comma
    body = " ".join(["we are experiencing correlated growth"] * 100)  # 500 words, no comma
    assert ifeval.score(r, body)["strict"] == [True, True, True]
    assert ifeval.score(r, body.replace("correlated", "linked"))["strict"] == [False, True, True]
    assert ifeval.score(r, body.rsplit(" ", 1)[0])["strict"] == [True, False, True]
    assert ifeval.score(r, body + ", done")["strict"] == [True, True, False]


@needs_scorer
def test_loose_forgives_a_leading_line(rows):
    preamble = "Sure, here it is:\n"
    quoted = by_key(rows, 122)  # startend:quotation
    assert ifeval.score(quoted, '"The internet began as ARPANET."') == {"strict": [True], "loose": [True]}
    assert ifeval.score(quoted, preamble + '"The internet began as ARPANET."') == {"strict": [False], "loose": [True]}
    as_json = by_key(rows, 1075)  # detectable_format:json_format
    assert ifeval.score(as_json, preamble + '{"product": "diaper"}') == {"strict": [False], "loose": [True]}
    lower = by_key(rows, 1051)
    assert ifeval.score(lower, preamble + LOWER) == {"strict": [False], "loose": [True]}
    # no variant helps when the body itself breaks the instruction
    assert ifeval.score(lower, preamble + LOWER.capitalize()) == {"strict": [False], "loose": [False]}


@needs_scorer
def test_loose_forgives_markdown_asterisks(rows):
    r = by_key(rows, 1220)  # startend:end_checker "Is there anything else I can help with?"
    assert ifeval.score(r, "A poem.\nIs there anything else I can help with?")["strict"] == [True]
    assert ifeval.score(r, "A poem.\n**Is there anything else I can help with?**") == {"strict": [False], "loose": [True]}


@needs_scorer
def test_kwargs_reach_the_checker():
    at_least_3 = row(["keywords:frequency"], [{"relation": "at least", "keyword": "story", "frequency": 3}])
    assert ifeval.score(at_least_3, "A story, a Story and a STORY.")["strict"] == [True]
    assert ifeval.score(at_least_3, "A story and a story.")["strict"] == [False]
    less_than_3 = row(["keywords:frequency"], [{"relation": "less than", "keyword": "story", "frequency": 3}])
    assert ifeval.score(less_than_3, "A story and a story.")["strict"] == [True]
    none_dropped = row(["punctuation:no_comma"], [{"unused": None}])  # HF-style kwargs: None values are dropped
    assert ifeval.score(none_dropped, "fine")["strict"] == [True]


@needs_scorer
def test_sentences_are_counted_without_nltk_data():
    """The untrained Punkt tokenizer stands in for nltk's "punkt_tab" data (not downloaded): it splits at
    . ? ! and knows no abbreviations, so "Mr. Smith" is two sentences (the trained model says one)."""
    fewer_than_3 = row(["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}])
    assert ifeval.score(fewer_than_3, "The ship is old. Fix the hull!")["strict"] == [True]
    assert ifeval.score(fewer_than_3, "The ship is old. Fix the hull! Now?")["strict"] == [False]
    assert ifeval.score(fewer_than_3, "Mr. Smith went home. He slept.")["strict"] == [False]


@needs_scorer
def test_capital_words_are_counted_without_nltk_data():
    at_least_2 = row(["change_case:capital_word_frequency"], [{"capital_relation": "at least", "capital_frequency": 2}])
    assert ifeval.score(at_least_2, "This is VERY important. Really, NOW.")["strict"] == [True]
    assert ifeval.score(at_least_2, "This is VERY important. Really, now.")["strict"] == [False]


@needs_scorer
def test_the_patch_stays_inside_the_scorer():
    import langdetect
    import nltk
    from if_verifiable.ifeval import instructions_util
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    word_tokenize = nltk.word_tokenize
    ifeval.score(row(["punctuation:no_comma"], [{}]), "x")
    assert nltk.word_tokenize is word_tokenize  # nltk itself is untouched
    assert isinstance(instructions_util._get_sentence_tokenizer(), PunktSentenceTokenizer)
    assert instructions_util.nltk.word_tokenize("Hi there. I'm OK!") == ["Hi", "there", ".", "I", "'m", "OK", "!"]
    assert instructions_util.nltk.tokenize is nltk.tokenize  # everything else is nltk's
    assert langdetect.DetectorFactory.seed == 0


@needs_scorer
def test_unknown_instruction_is_an_error():
    with pytest.raises(DatasetError, match="unknown instruction 'made:up'"):
        ifeval.score(row(["made:up"], [{}]), "text")


def test_missing_scorer_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ifeval, "_scorer_cache", None)
    for name in [m for m in sys.modules if m == "if_verifiable" or m.startswith("if_verifiable.")] or ["if_verifiable"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ifeval.IfevalExtraMissing, match=r"pip install 'localsteer\[ifeval\]'") as e:
        ifeval.score(row(["punctuation:no_comma"], [{}]), "text")
    assert "\n" not in str(e.value)


# --- summary ------------------------------------------------------------------------------------

def test_summary_arithmetic():
    T, F = True, False
    scored = [
        {"strict": [T, T], "loose": [T, T]},  # passes both ways
        {"strict": [T, F], "loose": [T, T]},  # passes loose only
        {"strict": [F], "loose": [F]},        # fails
        {"strict": [F, F, T], "loose": [T, F, T]},
    ]
    assert ifeval.summary(scored) == {
        "prompt_strict": 1 / 4, "prompt_loose": 2 / 4,
        "instruction_strict": 4 / 8, "instruction_loose": 6 / 8,
        "n_prompts": 4, "n_instructions": 8,
    }
    with pytest.raises(ValueError):
        ifeval.summary([])


# --- stratified sample --------------------------------------------------------------------------

def test_stratified_sample(rows):
    sample = ifeval.stratified_sample(rows, 100)
    assert len(sample) == 100
    assert len({r["key"] for r in sample}) == 100
    assert sample == ifeval.stratified_sample(rows, 100, seed=0) == ifeval.stratified_sample(list(rows), 100)
    assert sample != ifeval.stratified_sample(rows, 100, seed=1)
    positions = [rows.index(r) for r in sample]
    assert positions == sorted(positions)  # in file order
    full = Counter(r["instruction_id_list"][0] for r in rows)
    got = Counter(r["instruction_id_list"][0] for r in sample)
    for sid, size in full.items():
        assert abs(got[sid] - 100 * size / len(rows)) < 1, sid  # each first id keeps its share, to one prompt
    assert sum(got.values()) == 100


def test_stratified_sample_sizes(rows):
    assert ifeval.stratified_sample(rows, len(rows)) == rows
    one = ifeval.stratified_sample(rows, 1)
    assert [r["instruction_id_list"][0] for r in one] == ["detectable_format:number_highlighted_sections"]  # the largest
    for n in (0, -1, len(rows) + 1):
        with pytest.raises(ValueError):
            ifeval.stratified_sample(rows, n)
    small = [row([sid], [{}]) for sid in ["a"] * 6 + ["b"] * 3 + ["c"]]
    got = Counter(r["instruction_id_list"][0] for r in ifeval.stratified_sample(small, 5))
    assert got == {"a": 3, "b": 2}  # quotas 3, 1.5, 0.5: the leftover prompt goes to the larger stratum


def test_runs_side_by_side_merge_into_one_report(rows, tmp_path):
    """scripts/ifeval_merge.py: the replies of a second run (another model, in a copy of the
    results directory) join the first's, the report covers both, and runs made with other settings
    or disagreeing on a reply are refused without writing anything."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).parent.parent
    settings = {"sample": 200, "max_tokens": 1024, "alpha": 100.0, "p": 0.5, "trials": 10}
    keys = [r["key"] for r in ifeval.stratified_sample(rows, 200)[:3]]

    def reply(ok: bool) -> dict:
        return {"response": "x", "n_tokens": 10, "seconds": 1.0, "cut": False, "nll": 5.0,
                "statuses": {"unsteered": 10}, "strict": [ok], "loose": [ok]}

    def results_dir(name: str, model: str, passing: int, **extra) -> Path:
        d = tmp_path / name
        d.mkdir()
        replies = {f"{model}|{c}|{k}": reply(i < passing) for c in ("plain", "directer") for i, k in enumerate(keys)}
        (d / "replies.json").write_text(json.dumps({"settings": {**settings, **extra}, "replies": replies,
                                                    "command": "first"}))
        return d

    a, b = results_dir("a", "big", 1), results_dir("b", "small", 2)
    merge = [sys.executable, str(root / "scripts" / "ifeval_merge.py")]
    proc = subprocess.run([*merge, b, a, "--command", "both"], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "merged 6 replies" in proc.stdout
    merged = json.loads((a / "replies.json").read_text())
    assert len(merged["replies"]) == 12 and merged["command"] == "both"
    results = json.loads((a / "results.json").read_text())
    assert results["cells"]["small|plain"]["prompt_strict"] == pytest.approx(2 / 3)
    assert results["cells"]["big|directer"]["prompt_strict"] == pytest.approx(1 / 3)
    assert "Made by `both`" in (a / "results.md").read_text()
    big = results["paired"]["big"]["conditions"]["directer"]  # the same prompts pass as under plain
    assert (big["won_vs_plain"], big["lost_vs_plain"], big["prompt_strict_vs_plain_se"]) == (0, 0, 0)
    assert "| big | directer | 3 | 33.3% | +0.0 ± 0.0 | 0 / 0 |" in (a / "results.md").read_text()

    before = (a / "replies.json").read_bytes()
    other = results_dir("c", "small", 2, alpha=50.0)
    proc = subprocess.run([*merge, other, a], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 1 and "settings differ" in proc.stderr
    clash = results_dir("d", "big", 3)  # big's replies, scored otherwise
    proc = subprocess.run([*merge, clash, a], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 1 and "replies differ" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([*merge, empty, a], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 1 and "is not the replies of an IFEval run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (a / "replies.json").read_bytes() == before


def test_paired_difference_counts_won_and_lost_prompts_and_its_standard_error():
    from localsteer.eval.ifeval_run import _against_plain
    # 10 prompts: the condition passes 3 that plain fails and fails 1 that plain passes
    passed = [True, True, True, False, True, False, False, False, False, False]
    plain = [False, False, False, True, True, False, False, False, False, False]
    got = _against_plain(passed, plain)
    assert got["won_vs_plain"] == 3 and got["lost_vs_plain"] == 1
    diffs = [a - b for a, b in zip(passed, plain)]  # +1, 0, -1 per prompt
    mean = sum(diffs) / 10
    sd = (sum((d - mean) ** 2 for d in diffs) / 10) ** 0.5
    assert got["prompt_strict_vs_plain_se"] == pytest.approx(sd / 10 ** 0.5, abs=1e-4)
    assert _against_plain([True, False], [True, False]) == {"won_vs_plain": 0, "lost_vs_plain": 0,
                                                             "prompt_strict_vs_plain_se": 0.0}
