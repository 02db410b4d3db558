"""`localsteer eval` end to end on the real SmolLM2-135M model (the grid; the same code runs every
shipped model), with --limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
GRID_MODEL = "smollm2-135m-instruct"


def test_eval_grid_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "localsteer.cli", "eval", "--model", GRID_MODEL,
           "--types", "lowercase", "--compose", "lowercase+exclude_word", "--limit", "2", "-n", "24",
           "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert first.returncode == 0, first.stderr
    data = json.loads((out / "results.json").read_text())
    cells = data["cells"]
    conds = ["plain", "steer", "instr", "instr+steer", "steer+rej", "instr+steer+rej", "over", "over+rej"]
    for c in conds:
        cell = cells[f"{GRID_MODEL}|lowercase|{c}"]
        assert cell["n"] == 2 and 0 <= cell["accuracy"] <= cell["pass_rate"] <= 1
        assert cell["perplexity"] > 1 and cell["tokens_per_second"] > 0
    # the verifier really ran: the plain model does not write in lowercase by itself
    assert cells[f"{GRID_MODEL}|lowercase|plain"]["pass_rate"] == 0
    for by in ("lowercase", "exclude_word", "lowercase+exclude_word"):  # each alone and the sum, with and without rejection
        for c in ("steer", "steer+rej"):
            assert cells[f"{GRID_MODEL}|joint lowercase&exclude_word by {by}|{c}"]["n"] == 2
    kl = data["benign_kl"][f"{GRID_MODEL}|lowercase"]
    assert 0 < kl["steer"] < kl["over"]  # side effects grow with the strength
    md = (out / "results.md").read_text()
    assert f"| {GRID_MODEL} | lowercase |" in md and "Composition" in md and "benign KL" in md
    assert "| lowercase&exclude_word by lowercase+exclude_word | rejection |" in md
    # every cell's speed is reported too: a row of tokens/s per (model, instruction), a column for the sums
    speeds = md[md.index("Speed: tokens/s"):]
    speed_row = next(line for line in speeds.splitlines() if line.startswith(f"| {GRID_MODEL} | lowercase |"))
    assert [float(x) for x in speed_row.strip("| ").split(" | ")[2:]] == pytest.approx(
        [cells[f"{GRID_MODEL}|lowercase|{c}"]["tokens_per_second"] for c in conds], abs=0.051)
    assert "| median perplexity | tok/s |" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    # a rerun finds every cell done and computes nothing
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 0 and "accuracy" not in second.stdout
    assert json.loads((out / "results.json").read_text()) == data
    # resuming with other settings would mix cells made two ways: refused, nothing touched
    other = subprocess.run(cmd + ["--reject-minp", "0.1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert other.returncode == 1 and "made with other settings (reject_minp 0.0 here, 0.1 asked)" in other.stderr
    assert "Traceback" not in other.stderr
    assert json.loads((out / "results.json").read_text()) == data


def test_eval_rejects_unknown_types(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "localsteer.cli", "eval", "--types", "klingon",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "unknown instruction type(s): klingon" in proc.stderr


@pytest.mark.nomodel
def test_settings_check_lets_new_grids_and_older_files_through():
    from localsteer.eval.grid import check_settings
    new = {"max_tokens": 32, "reject_topk": 20, "reject_minp": 0.1}
    check_settings({}, new, ROOT)  # nothing finished yet
    check_settings({"max_tokens": 32, "reject_topk": 20}, {**new, "reject_minp": 0.0}, ROOT)  # older file: min-p 0
    with pytest.raises(ValueError, match="reject_minp 0.0 here, 0.1 asked"):
        check_settings({"max_tokens": 32, "reject_topk": 20}, new, ROOT)
    with pytest.raises(ValueError, match="max_tokens 48 here, 32 asked"):
        check_settings({"max_tokens": 48, "reject_topk": 20, "reject_minp": 0.1}, new, ROOT)
    # older files were made with the fold each vector asks for ("auto")
    check_settings({"max_tokens": 32, "reject_topk": 20, "reject_minp": 0.1}, {**new, "reject_fold": "auto"}, ROOT)
    with pytest.raises(ValueError, match="reject_fold auto here, recase asked"):
        check_settings({"max_tokens": 32, "reject_topk": 20, "reject_minp": 0.1}, {**new, "reject_fold": "recase"}, ROOT)


def test_ifeval_runs_scores_and_resumes(tmp_path, monkeypatch):
    """`localsteer eval --benchmark ifeval` on SmolLM2, 2 prompts, short replies: every cell is
    scored with IFEval's checkers, and a rerun reads the replies it has instead of generating."""
    pytest.importorskip("if_verifiable")
    from localsteer import api
    from localsteer.eval import ifeval, ifeval_run

    model = api.load_model("smollm2-135m-instruct")
    out = tmp_path / "ifeval"
    conditions = ["plain", "directer", "vector+rej"]
    first = api.evaluate_ifeval([("smol", model)], out, conditions, sample=20, limit=2, max_tokens=16,
                                log=lambda s: None, command="localsteer eval --benchmark ifeval ...")
    assert set(first["cells"]) == {"smol|plain", "smol|directer", "smol|vector+rej"}
    for cell in first["cells"].values():
        assert cell["n_prompts"] == 2 and 0 <= cell["prompt_strict"] <= cell["prompt_loose"] <= 1
        assert cell["cut"] <= 2 and 1 <= cell["perplexity"] < 100
    paired = first["paired"]["smol"]
    assert paired["n_prompts"] == 2 and set(paired["conditions"]) == set(conditions)
    assert paired["conditions"]["plain"]["prompt_strict_vs_plain"] == 0
    assert paired["conditions"]["plain"]["perplexity_vs_plain"] == 1
    md = (out / "results.md").read_text()
    assert md.count("| smol |") == 6 and "Made by `localsteer eval --benchmark ifeval ...`" in md
    replies = json.loads((out / "replies.json").read_text())["replies"]
    assert len(replies) == 6 and all("strict" in r and "response" in r for r in replies.values())
    # vector+rej: a prompt with no shipped vector for its instructions gets the plain reply, not
    # generated again; the other (a letter-case instruction) is steered
    rows = {r["key"]: r for r in ifeval.load_prompts()}
    has_vector = {k: any(i in ifeval_run.VECTORS for i in rows[int(k.split("|")[2])]["instruction_id_list"])
                  for k in replies if "|vector+rej|" in k}
    assert sorted(has_vector.values()) == [False, True]
    for k, steered in has_vector.items():
        assert (replies[k].get("reused") == "plain") is not steered
        if not steered:
            assert replies[k]["response"] == replies[k.replace("vector+rej", "plain")]["response"]
    monkeypatch.setattr(ifeval_run, "_reply", lambda *a, **k: pytest.fail("a finished reply was generated again"))
    again = api.evaluate_ifeval([("smol", model)], out, conditions, sample=20, limit=2, max_tokens=16,
                                log=lambda s: None)
    assert again["cells"] == first["cells"]
    with pytest.raises(api.DatasetError, match="was made with"):
        api.evaluate_ifeval([("smol", model)], out, ["plain"], sample=20, limit=2, max_tokens=32, log=lambda s: None)
