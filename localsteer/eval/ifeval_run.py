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
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from .. import api, measure
from ..errors import DatasetError
from ..fileio import write_atomic, write_text
from . import ifeval

CONDITIONS = api.IFEVAL_CONDITIONS
VECTORS = {"change_case:english_lowercase": "lowercase", "change_case:english_capital": "uppercase"}
SAMPLE = 200  # a fixed stratified sample, the same for every model and condition


def sample_rows(sample: int) -> list[dict]:
    """The prompts a run of this sample size answers: the fixed stratified sample, or all 541."""
    rows = ifeval.load_prompts()
    return ifeval.stratified_sample(rows, sample) if sample < ifeval.N_PROMPTS else rows


def run(models: Sequence[tuple[str, api.Model]], out_dir: Path, conditions: Sequence[str] = CONDITIONS,
        sample: int = SAMPLE, limit: int | None = None, max_tokens: int = 1024, settings: api.Directer = api.Directer(),
        log: Callable[[str], None] = print, command: str | None = None) -> dict:
    """Answer and score the sample under each condition; returns results.json's content.

    The prompts are the outer loop (each prompt under every condition before the next prompt), so
    a run stopped midway compares the conditions on the same prompts."""
    rows = sample_rows(sample)
    rows = rows[:limit] if limit else rows
    out_dir = Path(out_dir)
    path = out_dir / "replies.json"
    settings_now = {"sample": sample, "max_tokens": max_tokens, "alpha": settings.alpha, "p": settings.p,
                    "trials": settings.trials}
    data = json.loads(path.read_text()) if path.is_file() else {"settings": settings_now, "replies": {}}
    if data["settings"] != settings_now:
        raise DatasetError(f"{path} was made with {data['settings']}, not {settings_now}: use another --out")
    if command:
        data["command"] = command
    greedy = api.sampling_config(temperature=0)
    for name, model in models:
        todo = [r for r in rows if any(f"{name}|{c}|{r['key']}" not in data["replies"] for c in conditions)]
        log(f"{name}: {len(rows) - len(todo)} of {len(rows)} prompts done under {', '.join(conditions)}")
        for n, row in enumerate(todo, 1):
            for condition in conditions:
                key = f"{name}|{condition}|{row['key']}"
                if key in data["replies"]:
                    continue
                data["replies"][key] = _answer(model, name, condition, row, greedy, max_tokens, settings, data["replies"])
            write_text(path, json.dumps(data, indent=0, ensure_ascii=False))
            if n % 10 == 0 or n == len(todo):
                report(data, rows, out_dir)
                log(f"{name}: {len(rows) - len(todo) + n} of {len(rows)} prompts done")
    return report(data, rows, out_dir)


def _answer(model: api.Model, name: str, condition: str, row: dict, sampling, max_tokens: int,
            settings: api.Directer, done: dict) -> dict:
    """One reply, scored, with its perplexity under the plain model. `vector+rej` on a prompt no
    shipped vector matches is the plain reply (greedy decoding is deterministic): reused when
    there is one."""
    vector = next((VECTORS[i] for i in row["instruction_id_list"] if i in VECTORS), None)
    if condition == "vector+rej" and vector is None and f"{name}|plain|{row['key']}" in done:
        return {**done[f"{name}|plain|{row['key']}"], "reused": "plain"}
    t0 = time.perf_counter()
    reply, statuses = _reply(model, name, condition, row, sampling, max_tokens, settings)
    seconds = time.perf_counter() - t0
    ppl = measure.perplexity(model, api.chat_prompt(model, row["prompt"]), reply.tokens)
    return {"response": reply.text, "n_tokens": len(reply.tokens), "seconds": round(seconds, 2),
            "cut": len(reply.tokens) >= max_tokens and not model.is_eog(reply.tokens[-1]),
            "nll": round(math.log(ppl) * len(reply.tokens), 4) if reply.tokens else 0.0,
            "statuses": statuses, **ifeval.score(row, reply.text)}


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


def _cell(reps: list[dict]) -> dict:
    s = ifeval.summary(reps)
    s["cut"] = sum(r["cut"] for r in reps)
    generated = [r for r in reps if "reused" not in r]
    s["tokens_per_second"] = round(sum(r["n_tokens"] for r in generated) / max(1e-9, sum(r["seconds"] for r in generated)), 2)
    n_tokens = sum(r["n_tokens"] for r in reps)
    s["perplexity"] = round(math.exp(sum(r["nll"] for r in reps) / n_tokens), 4) if n_tokens else float("nan")
    s["mean_tokens"] = round(n_tokens / len(reps), 1)
    return s


def report(data: dict, rows: Sequence[dict], out_dir: Path) -> dict:
    """results.json, results.md and results.png from the replies so far. Besides each cell on
    the prompts it has, `paired` compares every model's conditions on the prompts all of them
    have answered: prompt-level strict accuracy and its difference from plain, perplexity (of the
    replies under the plain model, over all their tokens) and its ratio to plain's."""
    order = {r["key"]: i for i, r in enumerate(rows)}
    cells: dict[str, dict[int, dict]] = {}
    for key, rep in data["replies"].items():
        model, condition, k = key.split("|")
        if int(k) in order:
            cells.setdefault(f"{model}|{condition}", {})[int(k)] = rep
    results = {"settings": data["settings"], "command": data.get("command"), "n_sample": len(rows), "cells": {},
               "paired": {}}
    rank = {c: i for i, c in enumerate(CONDITIONS)}

    def order_key(cell: str) -> tuple:
        model, condition = cell.split("|")
        return model, rank.get(condition, len(rank)), condition

    for cell, reps in sorted(cells.items(), key=lambda kv: order_key(kv[0])):
        results["cells"][cell] = _cell(list(reps.values()))
    for model in sorted({c.split("|")[0] for c in cells}):
        mine = {c.split("|")[1]: reps for c, reps in cells.items() if c.split("|")[0] == model}
        common = sorted(set.intersection(*(set(r) for r in mine.values())), key=order.get)
        if not common:
            continue
        paired = {cond: _cell([reps[k] for k in common])
                  for cond, reps in sorted(mine.items(), key=lambda kv: order_key(f"{model}|{kv[0]}"))}
        base = paired.get("plain")
        for cond, s in paired.items():
            if base is not None:
                s["prompt_strict_vs_plain"] = round(s["prompt_strict"] - base["prompt_strict"], 4)
                s["perplexity_vs_plain"] = round(s["perplexity"] / base["perplexity"], 4)
                s.update(_against_plain([all(mine[cond][k]["strict"]) for k in common],
                                        [all(mine["plain"][k]["strict"]) for k in common]))
        results["paired"][model] = {"n_prompts": len(common), "conditions": paired}
    write_text(out_dir / "results.json", json.dumps(results, indent=1))
    write_text(out_dir / "results.md", markdown(results))
    _plot(results, out_dir / "results.png")
    return results


def _against_plain(passed: Sequence[bool], plain: Sequence[bool]) -> dict:
    """The prompts a condition passes (strict) and plain fails (won) and the reverse (lost), and
    the standard error of the paired difference in prompt-level accuracy: the spread of the
    per-prompt differences (+1, 0, -1) over sqrt(n)."""
    n = len(passed)
    won = sum(a and not b for a, b in zip(passed, plain))
    lost = sum(b and not a for a, b in zip(passed, plain))
    mean = (won - lost) / n
    return {"won_vs_plain": won, "lost_vs_plain": lost,
            "prompt_strict_vs_plain_se": round(math.sqrt(max(0.0, (won + lost) / n - mean * mean) / n), 4)}


def markdown(results: dict) -> str:
    st = results["settings"]
    lines = [f"IFEval, {results['n_sample']} prompts (a fixed stratified sample of {st['sample']}), greedy, at most "
             f"{st['max_tokens']} tokens a reply; DIRECTER alpha {st['alpha']:g}, p {st['p']:g}, {st['trials']} trials, "
             "the whole user message amplified. Scored with the IFEval checkers of `if-verifiable`; nltk's trained "
             "punkt data is not installed: an untrained Punkt tokenizer counts sentences and splits words "
             "(localsteer/eval/ifeval.py). Perplexity: of the replies under the plain model, over all their tokens."]
    if results.get("command"):
        lines += ["", f"Made by `{results['command']}` (it resumes where it stopped)."]
    if results["paired"]:
        lines += ["", "Paired: each model's conditions on the prompts all of them have answered. vs plain: the "
                  "difference in points ± its standard error (the per-prompt differences' spread over sqrt(n)), "
                  "and the prompts passed where plain fails / failed where plain passes.", "",
                  "| model | condition | prompts | prompt strict | vs plain | won / lost | prompt loose | "
                  "instruction strict | instruction loose | perplexity | vs plain | replies cut |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model, p in results["paired"].items():
            for cond, s in p["conditions"].items():
                vs = s.get("prompt_strict_vs_plain")
                ratio = s.get("perplexity_vs_plain")
                diff = '' if vs is None else f"{100 * vs:+.1f} ± {100 * s['prompt_strict_vs_plain_se']:.1f}"
                won = '' if vs is None else f"{s['won_vs_plain']} / {s['lost_vs_plain']}"
                lines.append(f"| {model} | {cond} | {p['n_prompts']} | {s['prompt_strict']:.1%} | {diff} | {won} | "
                             f"{s['prompt_loose']:.1%} | "
                             f"{s['instruction_strict']:.1%} | {s['instruction_loose']:.1%} | {s['perplexity']:.3f} | "
                             f"{'' if ratio is None else f'{ratio:.3f}x'} | {s['cut']} |")
    lines += ["", "Every cell on the prompts it has answered:", "",
              "| model | condition | prompts scored | prompt strict | prompt loose | instruction strict | "
              "instruction loose | perplexity | mean tokens | replies cut | tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, s in results["cells"].items():
        model, condition = cell.split("|")
        lines.append(f"| {model} | {condition} | {s['n_prompts']} | {s['prompt_strict']:.1%} | {s['prompt_loose']:.1%} | "
                     f"{s['instruction_strict']:.1%} | {s['instruction_loose']:.1%} | {s['perplexity']:.3f} | "
                     f"{s['mean_tokens']:.0f} | {s['cut']} | {s['tokens_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    def label(model: str) -> str:  # two short lines: the full names would overlap
        return model.replace("-instruct", "").replace("-coder-", "-coder-\n")

    cells = {f"{label(m)}\n{c}\n({p['n_prompts']} prompts)": s
             for m, p in results["paired"].items() for c, s in p["conditions"].items()}
    if not cells:
        return
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(cells)), 3.4))
    names = list(cells)
    ax.bar(range(len(names)), [100 * cells[c]["prompt_strict"] for c in names],
           yerr=[100 * cells[c].get("prompt_strict_vs_plain_se", 0.0) for c in names], capsize=3)
    ax.set_xticks(range(len(names)), names, fontsize=6)
    ax.set_ylabel("prompt-level strict, %", fontsize=8)
    ax.set_title(f"IFEval (sample of {results['n_sample']}), each model's conditions on the same prompts\n"
                 "(bars: standard error of the difference from plain)", fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
