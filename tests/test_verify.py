"""The instruction checkers, task-fidelity matching and the shipped instruction sets (no model)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from localsteer.eval import verify
from localsteer.errors import DatasetError

pytestmark = pytest.mark.nomodel  # no model, no llama.cpp: `pytest -m nomodel` runs these in seconds

DATASETS = Path(__file__).resolve().parent.parent / "vectors" / "datasets"
INSTRUCTIONS = DATASETS / "instructions"
EXPECTED = {
    "lowercase": {"type": "lowercase"},
    "uppercase": {"type": "uppercase"},
    "json": {"type": "json"},
    "include_word": {"type": "include_word", "word": "wonderful"},
    "exclude_word": {"type": "exclude_word", "word": "water"},
    "short": {"type": "max_words", "n": 20},
    "no_commas": {"type": "no_commas"},
}


def ok(spec: dict, text: str) -> bool:
    return verify.check(spec, text)


# --- checkers -------------------------------------------------------------------------------------

LOWER = {"type": "lowercase"}
UPPER = {"type": "uppercase"}
JSON = {"type": "json"}
INCLUDE = {"type": "include_word", "word": "wonderful"}
EXCLUDE = {"type": "exclude_word", "word": "water"}
SHORT = {"type": "max_words", "n": 5}
NO_COMMAS = {"type": "no_commas"}


@pytest.mark.parametrize("text", ["hello there.", "the sea is calm; 3 boats sail at 5 p.m.", "café au lait", "  a  "])
def test_lowercase_passes(text):
    assert ok(LOWER, text)


@pytest.mark.parametrize("text", ["Hello there.", "all lowercase except the lasT", "I", "ÉCOLE", "", "   ", "123 !?"])
def test_lowercase_fails(text):
    assert not ok(LOWER, text)


@pytest.mark.parametrize("text", ["HELLO THERE.", "THE SEA IS CALM; 3 BOATS!", "ÉCOLE", "A"])
def test_uppercase_passes(text):
    assert ok(UPPER, text)


@pytest.mark.parametrize("text", ["HELLO THERe", "Hello", "café", "", "  ", "42 + 7 = 49"])
def test_uppercase_fails(text):
    assert not ok(UPPER, text)


@pytest.mark.parametrize("text", [
    '{"a": 1}',
    '  [1, 2, 3]\n',
    '{"fruits": ["kiwi", "orange"], "count": 2}',
    '```json\n{"a": 1}\n```',
    '```JSON\n[{"name": "Paris"}]\n```',
    '```\n{"a": [1, 2]}\n```',
    '\n```json\n{"a": 1}\n```\n',
    '```json {"a": 1} ```',
    '{}',
    '[]',
])
def test_json_passes(text):
    assert ok(JSON, text)


@pytest.mark.parametrize("text", [
    "",
    "   ",
    "Sure! Here it is: {\"a\": 1}",
    '{"a": 1} Hope this helps.',
    '```json\n{"a": 1}\n``` Hope this helps.',
    '```json\n{"a": 1,}\n```',
    "{'a': 1}",
    '"just a string"',
    "42",
    "true",
    "null",
    '```json\n{"a": 1}',
    '{"a": 1',
])
def test_json_fails(text):
    assert not ok(JSON, text)


@pytest.mark.parametrize("text", [
    "What a wonderful day.", "WONDERFUL!", "Wonderful, truly.", "it was 'wonderful'", "wonderful"])
def test_include_word_passes(text):
    assert ok(INCLUDE, text)


@pytest.mark.parametrize("text", ["What a lovely day.", "wonderfully done", "a wonderfulness", "wonder full", ""])
def test_include_word_fails(text):
    assert not ok(INCLUDE, text)


@pytest.mark.parametrize("text", [
    "Rivers carry rain to the sea.",
    # whole word only: inflections and compounds are allowed
    "The waters of the bay.", "A waterfall.", "Watery soup.", "Saltwater fish.",
])
def test_exclude_word_passes(text):
    assert ok(EXCLUDE, text)


@pytest.mark.parametrize("text", [
    "Boil the water first.", "Water is wet.", "WATER!", "salt-water", "(water)", "water"])
def test_exclude_word_fails(text):
    assert not ok(EXCLUDE, text)


def test_exclude_word_on_empty_text_passes():
    assert ok(EXCLUDE, "")


@pytest.mark.parametrize("text", ["One.", "one two three four five", "  one\ttwo\nthree  ", "a - b - c"])
def test_max_words_passes(text):
    assert ok(SHORT, text)


@pytest.mark.parametrize("text", ["one two three four five six", "", "   \n ", "a - b - c - d"])
def test_max_words_fails(text):
    assert not ok(SHORT, text)


def test_max_words_real_limit():
    spec = {"type": "max_words", "n": 20}
    assert ok(spec, " ".join(["word"] * 20))
    assert not ok(spec, " ".join(["word"] * 21))


@pytest.mark.parametrize("text", ["Plain text with no pauses.", "Lists: a; b; c.", "x"])
def test_no_commas_passes(text):
    assert ok(NO_COMMAS, text)


@pytest.mark.parametrize("text", ["Yes, indeed.", ",", "1,000", "中文，逗号", "", "  \n"])
def test_no_commas_fails(text):
    assert not ok(NO_COMMAS, text)


@pytest.mark.parametrize("spec", [
    {"type": "bold"},
    {},
    {"type": None},
    {"type": "include_word"},
    {"type": "exclude_word", "word": ""},
    {"type": "include_word", "word": 3},
    {"type": "max_words"},
    {"type": "max_words", "n": 0},
    {"type": "max_words", "n": "20"},
    {"type": "max_words", "n": True},
])
def test_bad_spec_raises_value_error(spec):
    with pytest.raises(ValueError):
        verify.check(spec, "some text")


def test_checks_cover_all_shipped_types():
    assert {spec["type"] for spec in EXPECTED.values()} == set(verify.CHECKS)


def test_strip_fence():
    assert verify.strip_fence('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert verify.strip_fence("  plain  ") == "plain"


# --- task fidelity --------------------------------------------------------------------------------

@pytest.mark.parametrize("answers,text", [
    (["56", "fifty-six"], "7 times 8 is 56."),
    (["56", "fifty-six"], "56"),
    (["56", "fifty-six"], "The answer: Fifty-Six!"),
    (["56"], "(56)"),
    (["56"], "7x8=56"),
    (["1000"], "That is 1,000 in total."),
    (["1,000"], "exactly 1000"),
    (["3.5"], "about 3.5 kilograms"),
    (["0", "zero"], "It melts at 0°C."),
    (["Paris"], "The capital of France is paris."),
    (["Paris"], "PARIS"),
    (["Shakespeare"], "It was Shakespeare's play."),
    (["eight", "8"], "A spider has eight legs."),
    (["Sun"], "The Sun."),
    (["Beijing", "Peking"], "It is Beijing."),
])
def test_task_correct_matches(answers, text):
    assert verify.task_correct(answers, text)


@pytest.mark.parametrize("answers,text", [
    (["56"], "The answer is 156."),
    (["56"], "The answer is 560."),
    (["56"], "It is 5.6 or 0.56."),
    (["56"], "56,000 people"),
    (["56", "fifty-six"], "It is 54."),
    (["eight", "8"], "There are eighteen of them, 18 in all."),
    (["Paris"], "A Parisian cafe."),
    (["Rome"], "Romeo and Juliet"),
    (["Paris"], ""),
    ([], "Paris"),
    ([""], "anything"),
])
def test_task_correct_rejects(answers, text):
    assert not verify.task_correct(answers, text)


# --- loading --------------------------------------------------------------------------------------

def _line(**over) -> str:
    obj = {"prompt": "Why is the sky blue?", "instruction": "Reply in lowercase.", "split": "train",
           "check": {"type": "lowercase"}}
    obj.update(over)
    return json.dumps(obj)


def test_load_instruction_set_and_split(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join([_line(), "", _line(split="validation"), _line(split="test"), _line()]) + "\n")
    items = verify.load_instruction_set(path)
    assert len(items) == 4
    assert [len(verify.split(items, s)) for s in verify.SPLITS] == [2, 1, 1]
    assert items[0] == json.loads(_line())
    with pytest.raises(ValueError):
        verify.split(items, "dev")


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (_line(prompt=""), "'prompt'"),
    (_line(instruction=None), "'instruction'"),
    (_line(split="dev"), "'split'"),
    (_line(check={"type": "bold"}), "unknown check type"),
    (_line(check={"type": "max_words"}), "'n'"),
    (_line(check={"type": "uppercase"}), "differs from the first line"),
])
def test_load_instruction_set_reports_file_and_line(tmp_path, bad, message):
    path = tmp_path / "set.jsonl"
    path.write_text(_line() + "\n\n" + bad + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3") + ".*" + re.escape(message)):
        verify.load_instruction_set(path)


def test_load_instruction_set_missing_or_empty(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        verify.load_instruction_set(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DatasetError, match="no lines"):
        verify.load_instruction_set(empty)


def test_load_instruction_set_rejects_contrastive_file():
    with pytest.raises(DatasetError, match=r"lowercase\.jsonl:1: 'split'"):
        verify.load_instruction_set(DATASETS / "lowercase.jsonl")


def test_load_tasks_reports_file_and_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"question": "What is 2 plus 2?", "answers": ["4", "four"]}) + "\n" +
                    json.dumps({"question": "What is 2 plus 3?", "answers": []}) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2") + ".*'answers'"):
        verify.load_tasks(path)


# --- the shipped datasets -------------------------------------------------------------------------

def test_shipped_instruction_files_are_the_expected_ones():
    assert {p.stem for p in INSTRUCTIONS.glob("*.jsonl")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_instruction_set(name):
    items = verify.load_instruction_set(INSTRUCTIONS / f"{name}.jsonl")
    n = len(items)
    assert n >= 66
    assert all(it["check"] == EXPECTED[name] for it in items)
    sizes = {s: len(verify.split(items, s)) for s in verify.SPLITS}
    for s, share in (("train", 1 / 2), ("validation", 1 / 6), ("test", 1 / 3)):
        assert abs(sizes[s] - n * share) <= 1, (s, sizes)
    # deterministic assignment: index mod 6 -> train, train, train, validation, test, test
    order = ["train"] * 3 + ["validation"] + ["test"] * 2
    assert [it["split"] for it in items] == [order[i % 6] for i in range(n)]
    prompts = [it["prompt"].strip().lower() for it in items]
    assert not [p for p, c in Counter(prompts).items() if c > 1], "duplicate prompts"
    phrasings = {it["instruction"] for it in items}
    assert len(phrasings) >= 8
    for s in verify.SPLITS:  # every split sees several phrasings
        assert len({it["instruction"] for it in verify.split(items, s)}) >= 5
    # no prompt already satisfies or mentions the word constraint
    word = EXPECTED[name].get("word")
    if word:
        assert not [it["prompt"] for it in items if re.search(rf"\b{word}\b", it["prompt"], re.I)]
        assert all(word in it["instruction"] for it in items)


def test_shipped_tasks():
    tasks = verify.load_tasks(DATASETS / "tasks.jsonl")
    assert len(tasks) >= 48
    questions = [t["question"].lower() for t in tasks]
    assert len(set(questions)) == len(questions)
    for t in tasks:
        # the question alone must not count as a correct answer (an echo is not an answer)
        assert not verify.task_correct(t["answers"], t["question"]), t
        # every answer matches itself, so a plain correct reply is recognised
        assert all(verify.task_correct(t["answers"], f"The answer is {a}.") for a in t["answers"]), t
        # answers survive the instructions the tasks are asked under (no commas, no 'water')
        assert all("," not in a and not re.search(r"\bwater\b", a, re.I) for a in t["answers"]), t
