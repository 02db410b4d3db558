"""Dynamic rejection at the eval grid's settings (`localsteer eval`, docs/results/eval): the shipped
instruction vectors at their strength and oversteered x4, rejection top-20 (letter case folded
for the case vectors, as the grid does), greedy replies of 32 tokens to the held-out prompts.

    .venv/bin/python scripts/bench_rejection_grid.py [--models qwen2.5-coder-0.5b-instruct,...]
        [--vectors json,uppercase,short,exclude_word] [--prompts 3] [--loops auto,drafted,joint]

Per model, in one run: the decode costs of the machine (calibrate.py: a decode of two rows over
one; the floor, 1 / that cost, is what a loop that evaluates a steered and a plain row per token
in one decode would reach at no other cost), then per cell (vector x scale):

  plain      tok/s with no vector (the same prompts)
  <loop>     tok/s with rejection, and / plain
  floor      the loop's tok/s over plain, divided by the floor (goal >= 0.75)
  rounds     rejection rounds per token (each a steered re-evaluation of one row)
  bound      1 / (two-row cost + re-evaluations per token): the floor once the rounds are paid
             (a round that leaves no layer evaluates nothing); the loop / it
  passed     the share of tokens that passed at the first try
  same       whether the loop chose the tokens, statuses and rounds of its token-by-token form:
             the two-context loop without drafting for "drafted", itself for "joint" (it evaluates
             one token of each sequence at a time already). The two differ on Qwen now and then
             in a near-tie: the drafted loop's plain side reads tokens two or three at a time,
             and a batch of several tokens of one sequence computes attention a little
             differently from single-token decodes (up to 0.4 in a logit; docs/methods.md).

tok/s is (n - 1) / (T(n) - T(1)) summed over the prompts (prompt processing cancels out), as in
bench_rejection.py. The token-by-token loops are run once per cell for the rounds and the
comparison, untimed. Run nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, calibrate, models  # noqa: E402
from localsteer.errors import LocalsteerError  # noqa: E402
from localsteer.eval import verify  # noqa: E402
from localsteer.eval.grid import OVERSTEER  # noqa: E402
from localsteer.importance import importance_order  # noqa: E402
from localsteer.runtime import default_threads  # noqa: E402
from localsteer.steer import Rejection, Steerer  # noqa: E402

MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"
VECTORS = "json,uppercase,short,exclude_word"
GREEDY = api.sampling_config(temperature=0)
TOKENS = 32


def timed(steerer: Steerer, prompt: list[int], n: int, fast: bool = True) -> tuple[float, list]:
    t0 = time.perf_counter()
    evs = list(steerer.generate(prompt, n, GREEDY, fast=fast))
    return time.perf_counter() - t0, evs


def speed(steerer: Steerer, prompts: list[list[int]]) -> tuple[float, list[list], list[bool]]:
    """tok/s over tokens 2..n of each reply, summed over the prompts; the replies' events and
    whether each ran the joint loop."""
    timed(steerer, prompts[0], 1)  # warm-up: contexts, calibration
    tokens = seconds = 0.0
    replies, joint = [], []
    for p in prompts:
        t1, _ = timed(steerer, p, 1)
        tn, evs = timed(steerer, p, TOKENS)
        tokens += len(evs) - 1
        seconds += tn - t1
        replies.append(evs)
        joint.append(steerer._joint_run)
    return tokens / seconds, replies, joint


def signature(replies: list[list]) -> list:
    return [[(e.token, str(e.status), e.rounds) for e in evs] for evs in replies]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--vectors", default=VECTORS)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--loops", default="auto")
    args = ap.parse_args()
    loops = args.loops.split(",")
    print(f"{default_threads()} threads; greedy, {TOKENS} tokens; reject top-20; {args.prompts} held-out "
          f"prompts per instruction; vectors at their strength and x{OVERSTEER:g}")
    worst: list[float] = []
    forms = [0, 0]  # replies in which the two loops' token-by-token forms differ, replies
    for name in args.models.split(","):
        path = models.resolve(name)
        model = api.load_model(str(path))
        c = calibrate.costs(model, fresh=True)
        two = c.rows[2] / c.one
        print(f"\n{name}: {c.describe()}; floor 1/{two:.2f} = {1 / two:.2f} x plain")
        head = f"{'vector':<18}{'plain':>7}" + "".join(f"{loop:>14}{'floor':>7}" for loop in loops)
        print(head + f"{'rounds':>8}{'bound':>7}{'/bound':>8}{'passed':>8}  same")
        plain = Steerer(model, details=False)
        fp = models.quick_fingerprint(path)
        for vname in args.vectors.split(","):
            vec = api.load_vector(ROOT / "vectors" / name / f"{vname}.gguf")
            items = verify.split(verify.load_instruction_set(ROOT / "vectors" / "datasets" / "instructions"
                                                             / f"{vname}.jsonl"), "test")[:args.prompts]
            prompts = [model.user_prompt(it["prompt"]) for it in items]
            base, _, _ = speed(plain, prompts)
            for scale in (1.0, OVERSTEER):
                v = vec * scale
                layers = list(vec.layers)
                order = importance_order(model, v, layers, fp)
                fold = str(vec.meta.get("reject_fold", "none"))
                want = {}
                for kind in ("drafted", "joint"):  # each loop's token-by-token form (joint: its only one)
                    ref = Steerer(model, v, layers, Rejection(topk=20, fold=fold, loop=kind), order, details=False)
                    want[kind] = signature([timed(ref, p, TOKENS, fast=False)[1] for p in prompts])
                    ref.close()
                ref = want["drafted"]
                forms[0] += sum(a != b for a, b in zip(want["drafted"], want["joint"]))
                forms[1] += len(prompts)
                n_ref = sum(len(r) for r in ref)
                rounds = sum(e[2] for r in ref for e in r) / n_ref
                # a round that leaves no layer evaluates nothing: the plain choice stands
                evals = sum(e[2] - (e[1] == "plain" and e[2] > 0) for r in ref for e in r) / n_ref
                passed = sum(e[2] == 0 and e[1] != "plain" for r in ref for e in r) / sum(len(r) for r in ref)
                bound = 1 / (two + evals)
                cells, same = "", True
                for loop in loops:
                    st = Steerer(model, v, layers, Rejection(topk=20, fold=fold, loop=loop), order, details=False)
                    tok_s, replies, joint = speed(st, prompts)
                    st.close()
                    same = same and all(got == want["joint" if j else "drafted"][i]
                                        for i, (got, j) in enumerate(zip(signature(replies), joint)))
                    ratio = tok_s / base
                    cells += f"{tok_s:>7.1f} ({ratio:.2f}){ratio * two:>7.2f}"
                    if loop == loops[0]:
                        worst.append(ratio * two)
                        first = ratio
                print(f"{vname + ' x' + format(scale, 'g'):<18}{base:>7.1f}{cells}{rounds:>8.2f}{bound:>7.2f}"
                      f"{first / bound:>8.2f}{passed:>8.0%}  {'yes' if same else 'NO'}")
        plain.close()
        model.close()
    print(f"\n{loops[0]}: the lowest share of the floor over all cells {min(worst):.2f} (goal >= 0.75)")
    print(f"the drafted and the joint loop's token-by-token forms differed in {forms[0]} of {forms[1]} replies")


if __name__ == "__main__":
    try:
        main()
    except LocalsteerError as e:
        sys.exit(f"error: {e}")
