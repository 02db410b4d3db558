"""`localsteer eval`: does steering make the model follow instructions, and at what cost?

For each model and instruction type, on the test split of `vectors/datasets/instructions/<type>.jsonl`,
greedy replies are generated under six conditions:

  plain           no instruction in the prompt, no steering
  steer           no instruction, the instruction vector
  instr           the instruction in the prompt, no steering
  instr+steer     both
  steer+rej       steer, with dynamic rejection
  instr+steer+rej instr+steer, with dynamic rejection
  over            no instruction, the vector at `oversteer` x its strength (strong enough to break
                  fluency on the shipped vectors)
  over+rej        over, with dynamic rejection: does rejection keep the effect and remove the damage?

Each cell records constraint accuracy (the checker passes AND the reply is fluent: perplexity
under the plain model at most `FLUENT_PPL`), the raw pass rate, task fidelity (the share of
`vectors/datasets/tasks.jsonl` questions answered correctly under the same condition), the median
perplexity and tokens/s. Per model and type, the vector's side effects are recorded too: benign
KL (measure.BenignKL on `benign.jsonl`'s test split) at its strength and at `oversteer`. Results
are saved after every cell, so a rerun skips finished cells.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..fileio import write_atomic, write_text
from . import verify
from ..dataset import Pair, load_split_prompts
from ..measure import FLUENT_PPL, BenignKL, perplexity
from ..runtime import Model
from ..reply import run as run_reply
from ..sampling import Sampling
from ..steer import Rejection, Steerer
from ..vector import ControlVector

CONDITIONS = ("plain", "steer", "instr", "instr+steer", "steer+rej", "instr+steer+rej", "over", "over+rej")
OVERSTEER = 4.0
TASK_TOKENS = 24  # the task questions have one-line answers


@dataclass(frozen=True)
class Cell:
    accuracy: float
    pass_rate: float
    fidelity: float
    perplexity: float
    tokens_per_second: float
    n: int
    sample: str

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def _reply(model: Model, steerer: Steerer, user: str, max_tokens: int) -> tuple[str, list[int], list[int], float]:
    """A greedy reply (the one reply loop, `reply.run`): its text, the prompt, the reply's tokens
    without the end token, and its tokens per second."""
    prompt = model.user_prompt(user)
    reply = run_reply(steerer, prompt, max_tokens, Sampling(temperature=0))
    body = [t for t in reply.tokens if not model.is_eog(t)]
    return reply.text, prompt, body, reply.tokens_per_second


@dataclass
class Replies:
    """Greedy replies to a prompt set, checked: `passes` of them pass every check, `fluent` of those
    also have perplexity <= FLUENT_PPL under the plain model."""
    texts: list[str]
    passes: int
    fluent: int
    perplexities: list[float]
    speeds: list[float]


def score_replies(model: Model, steerer: Steerer, users: Sequence[str], checks: Sequence[dict],
                  max_tokens: int) -> Replies:
    r = Replies([], 0, 0, [], [])
    for user in users:
        text, prompt, body, speed = _reply(model, steerer, user, max_tokens)
        ok = all(verify.check(c, text) for c in checks)
        ppl = perplexity(model, prompt, body) if body else float("inf")
        r.texts.append(text)
        r.passes += ok
        r.fluent += ok and ppl <= FLUENT_PPL
        r.perplexities.append(ppl)
        r.speeds.append(speed)
    return r


def run_cell(model: Model, condition: str, items: Sequence[dict], tasks: Sequence[dict],
             vector: ControlVector | None, layers: Sequence[int], rejection: Rejection,
             importance: Sequence[int] | None, checks: Sequence[dict], max_tokens: int,
             oversteer: float = OVERSTEER) -> Cell:
    """One (model, instruction, condition) cell. `checks` all must pass (composition)."""
    with_instr = condition.startswith("instr")
    steered = "steer" in condition or condition.startswith("over")
    if condition.startswith("over") and vector is not None:
        vector = vector * oversteer
    rej = rejection if condition.endswith("+rej") else None
    st = Steerer(model, vector if steered else None, layers if steered else None, rej,
                 importance if rej else None, details=False)
    try:
        users = [f"{it['prompt']} {it['instruction']}" if with_instr else it["prompt"] for it in items]
        r = score_replies(model, st, users, checks, max_tokens)
        correct = 0
        for t in tasks:
            user = f"{t['question']} {items[0]['instruction']}" if with_instr else t["question"]
            text, *_ = _reply(model, st, user, min(max_tokens, TASK_TOKENS))
            correct += verify.task_correct(t["answers"], text)
    finally:
        st.close()
    n = len(items)
    sample = next((t for t in r.texts if t), "")
    return Cell(r.fluent / n, r.passes / n, correct / max(1, len(tasks)), statistics.median(r.perplexities),
                statistics.mean(r.speeds), n, sample[:200])


class Results:
    """results.json, rewritten atomically after every cell; finished cells are skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.is_file() else {"cells": {}}

    def get(self, key: str) -> dict | None:
        return self.data["cells"].get(key)

    def put(self, key: str, cell: Cell) -> None:
        self.data["cells"][key] = cell.as_dict()
        self.put_extra()

    def put_extra(self) -> None:
        """Write the file again (after a change to `data` outside the cells)."""
        write_text(self.path, json.dumps(self.data, indent=1))


def markdown(results: dict) -> str:
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    joint: list[tuple[str, str, int, bool, str]] = []
    for key, cell in results["cells"].items():
        model, itype, cond = key.split("|")
        if itype.startswith("joint "):
            decoding = "rejection" if cond.endswith("+rej") else "steered"
            pair, label = itype[6:].split(" by ")
            a, b = pair.split("&")
            order = {a: 0, b: 1}.get(label, 2)  # each alone, then the sum
            joint.append((model, pair, order, decoding == "rejection",
                          f"| {model} | {itype[6:]} | {decoding} | {cell['pass_rate']:.0%} | {cell['accuracy']:.0%} | "
                          f"{cell['perplexity']:.1f} | {cell['tokens_per_second']:.1f} |"))
            continue
        rows.setdefault((model, itype), {})[cond] = cell
    settings = results.get("settings", {})
    lines = [f"Constraint accuracy (checker passes and perplexity <= {FLUENT_PPL:g}) / task fidelity / "
             "median perplexity, greedy, test split"
             + (f"; replies of {settings['max_tokens']} tokens, task answers of {settings['task_tokens']}, "
                f"rejection top-{settings['reject_topk']}"
                + (f" and min-p {settings['reject_minp']:g}" if settings.get("reject_minp") else "")
                + (f", plausibility {settings['reject_fold']}" if settings.get("reject_fold", "auto") != "auto" else "")
                + f", over = the vector x{settings['oversteer']:g}"
                if settings else "") + ".", "",
             "| model | instruction | " + " | ".join(CONDITIONS) + " |", "|---|---|" + "---|" * len(CONDITIONS)]
    for (model, itype), cells in sorted(rows.items()):
        out = []
        for c in CONDITIONS:
            cell = cells.get(c)
            out.append("" if cell is None else
                       f"{cell['accuracy']:.0%} / {cell['fidelity']:.0%} / {cell['perplexity']:.1f}")
        lines.append(f"| {model} | {itype} | " + " | ".join(out) + " |")
    if rows:
        lines += ["", "Speed: tokens/s of the replies (the mean over prompts, prompt evaluation included), "
                  "each cell as measured on the machine that ran the grid.", "",
                  "| model | instruction | " + " | ".join(CONDITIONS) + " |", "|---|---|" + "---|" * len(CONDITIONS)]
        for (model, itype), cells in sorted(rows.items()):
            speeds = ["" if cells.get(c) is None else f"{cells[c]['tokens_per_second']:.1f}" for c in CONDITIONS]
            lines.append(f"| {model} | {itype} | " + " | ".join(speeds) + " |")
    kls = results.get("benign_kl", {})
    if kls:
        lines += ["", f"Side effects: KL(plain ‖ steered) on the built-in benign prompts (test split, along the plain "
                  f"model's 16-token greedy replies), the vector at its strength and x{settings.get('oversteer', OVERSTEER):g}.",
                  "", "| model | instruction | benign KL, steer | benign KL, over |", "|---|---|---|---|"]
        for key, v in sorted(kls.items()):
            model, itype = key.split("|")
            lines.append(f"| {model} | {itype} | {v['steer']:.3f} | {v['over']:.3f} |")
    if joint:
        lines += ["", "Composition: both constraints at once, no instruction in the prompt, steering with "
                  "one vector or the sum, with and without dynamic rejection.", "",
                  "| model | constraints, steered by | decoding | joint pass | joint accuracy (fluent) | median perplexity "
                  "| tok/s |", "|---|---|---|---|---|---|---|", *(row[-1] for row in sorted(joint))]
    return "\n".join(lines) + "\n"


def pairs_of(items: Sequence[dict]) -> list[Pair]:
    return [Pair(f"{it['prompt']} {it['instruction']}", it["prompt"]) for it in items]


Progress = Callable[[str], None]


def instruction_vector(model: Model, model_name: str, itype: str, datasets: Path, vectors: Path,
                       cache: Path, model_sha256: str = "") -> ControlVector:
    """The shipped instruction vector for (model, type), else one extracted now and cached."""
    from ..instruction import extract_instruction

    for path in (vectors / model_name / f"{itype}.gguf", cache / model_name / f"{itype}.gguf"):
        if path.is_file():
            return ControlVector.load(path)
    items = verify.load_instruction_set(datasets / "instructions" / f"{itype}.jsonl")
    spec = items[0]["check"]
    res = extract_instruction(model, pairs_of(verify.split(items, "train")),
                              pairs_of(verify.split(items, "validation")),
                              lambda text: verify.check(spec, text), name=f"{itype}.jsonl",
                              model_sha256=model_sha256)
    out = cache / model_name / f"{itype}.gguf"
    res.vector.save(out, force=True)
    return res.vector


DEFAULT_SETTINGS = {"reject_minp": 0.0, "reject_fold": "auto"}  # settings that older results files do not name


def check_settings(old: dict, new: dict, out_dir: Path) -> None:
    """A resumed grid must be run with the settings its finished cells were made with."""
    if not old:  # a new grid
        return
    differ = [k for k in new if {**DEFAULT_SETTINGS, **old}.get(k, new[k]) != new[k]]
    if differ:
        raise ValueError(f"{out_dir / 'results.json'} was made with other settings ("
                         + ", ".join(f"{k} {old.get(k, DEFAULT_SETTINGS.get(k))} here, {new[k]} asked" for k in differ)
                         + "): use another --out, or the same settings to resume")


def run_grid(models: Sequence[tuple[str, Model]], types: Sequence[str], out_dir: Path, datasets: Path,
             vectors: Path, limit: int | None = None, max_tokens: int = 48, topk: int = 20,
             compose: Sequence[tuple[str, str]] = (), log: Callable[[str], None] = print,
             oversteer: float = OVERSTEER, conditions: Sequence[str] = CONDITIONS, minp: float = 0.0,
             fold: str = "auto") -> Results:
    """The whole grid; returns the results (also in out_dir/results.json and results.md)."""
    from ..importance import importance_order
    from ..models import quick_fingerprint

    results = Results(out_dir / "results.json")
    settings = {"max_tokens": max_tokens, "task_tokens": min(max_tokens, TASK_TOKENS), "reject_topk": topk,
                "reject_minp": minp, "reject_fold": fold, "oversteer": oversteer, "fluent_ppl": FLUENT_PPL}
    check_settings(results.data.get("settings", {}), settings, out_dir)
    results.data["settings"] = settings
    tasks = [json.loads(line) for line in (datasets / "tasks.jsonl").read_text().splitlines() if line.strip()]
    tasks = tasks[:limit] if limit else tasks
    for name, model in models:
        fp = quick_fingerprint(model.path)
        vecs: dict[str, ControlVector] = {}

        def vec_for(itype: str) -> ControlVector:
            if itype not in vecs:
                vecs[itype] = instruction_vector(model, name, itype, datasets, vectors, out_dir / "vectors")
            return vecs[itype]

        def cell(key: str, items, vector, checks, conditions):
            layers = list(vector.layers)
            # case-rewrite vectors ask for plausibility up to letter case (steer.Rejection.fold)
            asked = str(vector.meta.get("reject_fold", "none")) if fold == "auto" else fold
            rejection = Rejection(topk=topk, minp=minp, fold=asked)
            orders: dict[bool, list[int]] = {}
            for cond in conditions:
                k = f"{name}|{key}|{cond}"
                if results.get(k) is not None:
                    continue
                over = cond.startswith("over")
                if over not in orders and cond.endswith("+rej"):
                    orders[over] = importance_order(model, vector * (oversteer if over else 1.0), layers, fp)
                c = run_cell(model, cond, items, tasks, vector, layers, rejection, orders.get(over), checks,
                             max_tokens, oversteer)
                results.put(k, c)
                log(f"{name} {key:<24} {cond:<16} accuracy {c.accuracy:4.0%}  pass {c.pass_rate:4.0%}  "
                    f"fidelity {c.fidelity:4.0%}  ppl {c.perplexity:6.1f}  {c.tokens_per_second:5.1f} tok/s")

        benign: list[BenignKL] = []

        def side_effects(itype: str, vector: ControlVector) -> None:
            """Benign KL of the vector at its strength and oversteered (resumable like the cells)."""
            k = f"{name}|{itype}"
            kls = results.data.setdefault("benign_kl", {})
            if k in kls:
                return
            if not benign:
                prompts = load_split_prompts(datasets / "benign.jsonl")["test"]
                prompts = prompts[:limit] if limit else prompts
                benign.append(BenignKL(model, [model.user_prompt(p) for p in prompts]))
            layers = list(vector.layers)
            kls[k] = {"steer": benign[0].measure(vector.directions, layers),
                      "over": benign[0].measure(vector.directions * oversteer, layers)}
            results.put_extra()
            log(f"{name} {itype:<24} benign KL  steer {kls[k]['steer']:.3f}  over {kls[k]['over']:.3f}")

        for itype in types:
            items = verify.split(verify.load_instruction_set(datasets / "instructions" / f"{itype}.jsonl"), "test")
            items = items[:limit] if limit else items
            cell(itype, items, vec_for(itype), [items[0]["check"]], conditions)
            side_effects(itype, vec_for(itype))
            report(results, out_dir)
        joint_conditions = [c for c in ("steer", "steer+rej") if c in conditions]  # no instruction in the prompt
        for a, b in compose if joint_conditions else ():
            items = verify.split(verify.load_instruction_set(datasets / "instructions" / f"{a}.jsonl"), "test")
            items = items[:limit] if limit else items
            check_b = verify.load_instruction_set(datasets / "instructions" / f"{b}.jsonl")[0]["check"]
            checks = [items[0]["check"], check_b]
            for label, vector in ((a, vec_for(a)), (b, vec_for(b)), (f"{a}+{b}", vec_for(a) + vec_for(b))):
                cell(f"joint {a}&{b} by {label}", items, vector, checks, joint_conditions)
            report(results, out_dir)
    report(results, out_dir)
    return results


def report(results: Results, out_dir: Path) -> None:
    """results.md and results.png from the cells finished so far (rewritten after each type)."""
    write_text(out_dir / "results.md", markdown(results.data))
    plot(results.data, out_dir / "results.png")


def plot(results: dict, path: Path) -> Path | None:
    """A bar chart of constraint accuracy per instruction and condition (needs matplotlib,
    `pip install localsteer[plot]`); returns None without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows: dict[str, dict[str, dict[str, float]]] = {}  # model -> instruction -> condition -> accuracy
    for key, cell in results["cells"].items():
        model, itype, cond = key.split("|")
        if not itype.startswith("joint "):
            rows.setdefault(model, {}).setdefault(itype, {})[cond] = cell["accuracy"]
    if not rows:
        return None
    models = sorted(rows)
    n_types = max(len(types) for types in rows.values())
    fig, axes = plt.subplots(len(models), 1, figsize=(max(6.0, 1.5 * n_types), 3.0 * len(models)), squeeze=False)
    width = 0.8 / len(CONDITIONS)
    for ax, model in zip(axes[:, 0], models):
        labels = sorted(rows[model])
        for i, cond in enumerate(CONDITIONS):
            xs = [j + (i - len(CONDITIONS) / 2 + 0.5) * width for j in range(len(labels))]
            ax.bar(xs, [100 * rows[model][lab].get(cond, 0.0) for lab in labels], width, label=cond)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("accuracy, %", fontsize=8)
        ax.set_ylim(0, 100)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(CONDITIONS), fontsize=7, frameon=False)
    fig.suptitle(f"constraint accuracy (the checker passes and perplexity <= {FLUENT_PPL:g}), test split", fontsize=9)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
