"""`localsteer eval --benchmark ifeval`: IFEval's prompts answered under several conditions,
scored with the IFEval checkers (`ifeval.py`), resumable, reported as results.json, results.md
and results.png.

Conditions:
- `plain`: the model, greedy.
- `directer`: DIRECTER (localsteer/directer.py) amplifying the whole user message: IFEval's
  prompts mix the task and its instructions in one text, with no span marked.
- `vector+rej`: where a shipped vector matches one of the prompt's instructions (lowercase,
  capitals), that vector at its suggested scale with rejection (top-20, letter case folded);
  the prompts without a matching vector are answered plain, so the condition differs from
  `plain` only where a vector exists.

Every reply is greedy and at most `max_tokens` long; how many were cut is reported. Replies are
kept in replies.json (rewritten whole after each one), so a rerun with the same settings
resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from .. import api
from ..errors import DatasetError
from ..fileio import write_atomic, write_text
from . import ifeval

CONDITIONS = api.IFEVAL_CONDITIONS
VECTORS = {"change_case:english_lowercase": "lowercase", "change_case:english_capital": "uppercase"}
SAMPLE = 200  # a fixed stratified sample, the same for every model and condition


def run(models: Sequence[tuple[str, api.Model]], out_dir: Path, conditions: Sequence[str] = CONDITIONS,
        sample: int = SAMPLE, limit: int | None = None, max_tokens: int = 1024, settings: api.Directer = api.Directer(),
        log: Callable[[str], None] = print) -> dict:
    """Answer and score the sample under each condition; returns results.json's content."""
    rows = ifeval.stratified_sample(ifeval.load_prompts(), sample) if sample < ifeval.N_PROMPTS else ifeval.load_prompts()
    rows = rows[:limit] if limit else rows
    out_dir = Path(out_dir)
    path = out_dir / "replies.json"
    settings_now = {"sample": sample, "max_tokens": max_tokens, "alpha": settings.alpha, "p": settings.p,
                    "trials": settings.trials}
    data = json.loads(path.read_text()) if path.is_file() else {"settings": settings_now, "replies": {}}
    if data["settings"] != settings_now:
        raise DatasetError(f"{path} was made with {data['settings']}, not {settings_now}: use another --out")
    greedy = api.sampling_config(temperature=0)
    for name, model in models:
        for condition in conditions:
            todo = [r for r in rows if f"{name}|{condition}|{r['key']}" not in data["replies"]]
            log(f"{name} / {condition}: {len(rows) - len(todo)} of {len(rows)} done")
            for row in todo:
                t0 = time.perf_counter()
                reply, statuses = _reply(model, name, condition, row, greedy, max_tokens, settings)
                seconds = time.perf_counter() - t0
                scored = ifeval.score(row, reply.text)
                data["replies"][f"{name}|{condition}|{row['key']}"] = {
                    "response": reply.text, "n_tokens": len(reply.tokens), "seconds": round(seconds, 2),
                    "cut": len(reply.tokens) >= max_tokens and not model.is_eog(reply.tokens[-1]),
                    "statuses": statuses, **scored}
                write_text(path, json.dumps(data, indent=0, ensure_ascii=False))
            report(data, rows, out_dir)
    return report(data, rows, out_dir)


def _reply(model: api.Model, name: str, condition: str, row: dict, sampling, max_tokens: int,
           settings: api.Directer):
    prompt = row["prompt"]
    if condition == "directer":
        r = api.generate_directer(model, prompt, mark=prompt, settings=settings, sampling=sampling,
                                  max_tokens=max_tokens)
        return r, r.extra["directer"]["tokens"]
    vector = next((VECTORS[i] for i in row["instruction_id_list"] if i in VECTORS), None)
    if condition == "vector+rej" and vector is not None:
        spec = [vector]
        steering = api.steering_from_specs(model, spec)
        rejection = api.rejection_config(20, fold=api.fold_for(spec, model))
        r = api.generate(model, prompt, steering, sampling, max_tokens=max_tokens, rejection=rejection)
    else:
        r = api.generate(model, prompt, api.Steering(None, ()), sampling, max_tokens=max_tokens)
    return r, {s.value: sum(e.status == s for e in r.events) for s in {e.status for e in r.events}}


def report(data: dict, rows: Sequence[dict], out_dir: Path) -> dict:
    """results.json, results.md and results.png from the replies so far."""
    keys = {r["key"] for r in rows}
    cells: dict[str, dict] = {}
    for key, rep in data["replies"].items():
        model, condition, k = key.split("|")
        if int(k) in keys:
            cells.setdefault(f"{model}|{condition}", []).append(rep)
    results = {"settings": data["settings"], "n_sample": len(rows), "cells": {}}
    for cell, reps in sorted(cells.items()):
        s = ifeval.summary(reps)
        s["cut"] = sum(r["cut"] for r in reps)
        s["tokens_per_second"] = round(sum(r["n_tokens"] for r in reps) / max(1e-9, sum(r["seconds"] for r in reps)), 2)
        results["cells"][cell] = s
    write_text(out_dir / "results.json", json.dumps(results, indent=1))
    write_text(out_dir / "results.md", markdown(results))
    _plot(results, out_dir / "results.png")
    return results


def markdown(results: dict) -> str:
    st = results["settings"]
    lines = [f"IFEval, {results['n_sample']} prompts (a fixed stratified sample of {st['sample']}), greedy, at most "
             f"{st['max_tokens']} tokens a reply; DIRECTER alpha {st['alpha']:g}, p {st['p']:g}, {st['trials']} trials. "
             "Scored with the IFEval checkers of `if-verifiable`; nltk's trained punkt data is not installed: an "
             "untrained Punkt tokenizer counts sentences and splits words (localsteer/eval/ifeval.py).", "",
             "| model | condition | prompts scored | prompt strict | prompt loose | instruction strict | "
             "instruction loose | replies cut | tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for cell, s in results["cells"].items():
        model, condition = cell.split("|")
        lines.append(f"| {model} | {condition} | {s['n_prompts']} | {s['prompt_strict']:.1%} | {s['prompt_loose']:.1%} | "
                     f"{s['instruction_strict']:.1%} | {s['instruction_loose']:.1%} | {s['cut']} | "
                     f"{s['tokens_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cells = results["cells"]
    if not cells:
        return
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cells)), 3.2))
    names = list(cells)
    ax.bar(range(len(names)), [100 * cells[c]["prompt_strict"] for c in names])
    ax.set_xticks(range(len(names)), [c.replace("|", "\n") for c in names], fontsize=7)
    ax.set_ylabel("prompt-level strict, %", fontsize=8)
    ax.set_title(f"IFEval, {results['n_sample']} prompts", fontsize=9)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
