"""Side effects of refusal steering, and what gating and rejection do about them (issue 7's table).

    .venv/bin/python scripts/side_effects_table.py [--model qwen2.5-coder-0.5b-instruct] [--limit N]
        [--out docs/results/side-effects-qwen2.5-coder-0.5b-instruct.md]

The vector is the shipped refusal addition vector (`vectors/<model>/refusal/refusal-add.gguf`, at
its suggested scale); the probe is the shipped harmful-request probe (`vectors/<model>/probes/
harmful.gguf`, made by `localsteer probe train`); the KTS adapter is `refusal-add-kts.gguf` (made
by `localsteer kts train`). Rows: plain; steering; steering gated by the probe (`--when`: a prompt
it does not flag gets the plain model); the KTS adapter with the vector, alone and gated; dynamic
rejection (top-20), alone and gated. Columns, all greedy:

- refusal on the harmful test requests (the effect wanted) and on the harmless ones (24 tokens);
- benign KL: KL(plain ‖ steered) on the built-in benign prompts (test split), as `localsteer kl`;
  with the KTS adapter, KL(plain ‖ steered + adapter); gated, a prompt the probe does not flag
  contributes 0; rejection changes which token is taken,
  not the distributions, so it has no KL of its own ("n/a");
- benign replies unchanged: the share of benign prompts whose 32-token reply is the plain one;
- task fidelity: the built-in short questions (vectors/datasets/tasks.jsonl) answered correctly;
- tok/s on the harmful requests (the probe's read of the prompt, done once per prompt up front,
  not included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, verify  # noqa: E402
from localsteer.dataset import load_split_prompts  # noqa: E402
from localsteer.measure import BenignKL  # noqa: E402
from localsteer.refusal import is_refusal, load_sets  # noqa: E402
from localsteer.sampling import Sampling  # noqa: E402
import numpy as np  # noqa: E402  (after localsteer, which loads llama.cpp first)

GREEDY = Sampling(temperature=0.0)
ROWS = (  # name, steered, gated, KTS adapter, rejection
    ("plain", False, False, False, False),
    ("steering", True, False, False, False),
    ("steering, gated by the probe", True, True, False, False),
    ("KTS adapter + steering", True, False, True, False),
    ("KTS adapter + steering, gated", True, True, True, False),
    ("steering + rejection (top-20)", True, False, False, True),
    ("steering, gated + rejection", True, True, False, True),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--limit", type=int, default=None, help="At most N prompts of each set (a quick run).")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shipped = ROOT / "vectors" / args.model
    vector_spec = str(shipped / "refusal" / "refusal-add.gguf")
    kts_path = shipped / "refusal" / "refusal-add-kts.gguf"
    probe_path = shipped / "probes" / "harmful.gguf"
    lim = slice(None, args.limit)
    sets = load_sets(ROOT / "vectors" / "datasets" / "refusal")
    harmful, harmless = sets.harmful["test"][lim], sets.harmless["test"][lim]
    benign = load_split_prompts(api.BENIGN)["test"][lim]
    tasks = verify.load_tasks(ROOT / "vectors" / "datasets" / "tasks.jsonl")[lim]

    model = api.load_model(args.model)
    steering = api.steering_from_specs(model, [vector_spec])
    gate = api.load_gate(model, probe_path)
    kts = api.load_adapters(model, [str(kts_path)])
    # the probe's decision for every prompt, read once (the gate does the same per reply)
    users = harmful + harmless + benign + [t["question"] for t in tasks]
    p_all = gate.probe.prompt_probability(model, [api.chat_prompt(model, u) for u in users])
    fires = {u: bool(p >= gate.probe.threshold) for u, p in zip(users, p_all)}
    benign_tokens = [api.chat_prompt(model, p) for p in benign]
    fired = np.array([fires[p] for p in benign])
    bk = BenignKL(model, benign_tokens, n_tokens=16)
    kl_each = {False: bk.each(steering.vector.directions, steering.layers),
               True: bk.each(steering.vector.directions, steering.layers, kts)}
    plain_st = api.make_steerer(model, api.Steering(None, ()))

    plain_benign: list[list[int]] = []
    lines = []
    for name, steered, gated, with_kts, rejecting in ROWS:
        t0 = time.perf_counter()
        rejection = api.rejection_config(20) if rejecting else None
        st = api.make_steerer(model, steering, rejection, adapters=kts if with_kts else ()) if steered else plain_st

        def reply(text: str, n: int):
            if not steered or (gated and not fires[text]):  # a prompt the probe passes: the plain model
                return api.generate(model, text, api.Steering(None, ()), GREEDY, max_tokens=n, steerer=plain_st)
            return api.generate(model, text, steering, GREEDY, max_tokens=n, rejection=rejection, steerer=st)

        try:
            runs = [reply(p, 24) for p in harmful]
            refuse_harmful = np.mean([is_refusal(r.text) for r in runs])
            speed = np.mean([r.tokens_per_second for r in runs])
            refuse_harmless = np.mean([is_refusal(reply(p, 24).text) for p in harmless])
            outs = [reply(p, 32).tokens for p in benign]
            if not steered:
                plain_benign = outs
            unchanged = np.mean([a == b for a, b in zip(outs, plain_benign)])
            fidelity = np.mean([verify.task_correct(t["answers"], reply(t["question"], 24).text) for t in tasks])
        finally:
            if st is not plain_st:
                st.close()
        if not steered:
            kl = "0"
        elif rejecting:
            kl = "n/a"
        else:
            each = kl_each[with_kts]
            kl = f"{float(np.mean(each * fired if gated else each)):.3f}"
        line = (f"| {name} | {refuse_harmful:.0%} | {refuse_harmless:.0%} | {kl} | {unchanged:.0%} | "
                f"{fidelity:.0%} | {speed:.1f} |")
        lines.append(line)
        print(line, f"({time.perf_counter() - t0:.0f} s)", flush=True)
    plain_st.close()

    head = ("| condition | refusal, harmful | refusal, harmless | benign KL | benign replies unchanged | "
            "task fidelity | tok/s |\n|---|---|---|---|---|---|---|")
    md = (f"## Side effects of refusal steering on {model.info.name}\n\n"
          f"`python scripts/side_effects_table.py --model {args.model}{' --limit ' + str(args.limit) if args.limit else ''}`"
          f": vector `{Path(vector_spec).relative_to(ROOT)}` ({steering.describe()}), KTS adapter "
          f"`{kts_path.relative_to(ROOT)}`, probe "
          f"`{probe_path.relative_to(ROOT)}` (layer {gate.probe.layer}, threshold {gate.probe.threshold:.2f}); "
          f"{len(harmful)} harmful / {len(harmless)} harmless test requests, {len(benign)} benign prompts "
          f"(the probe flags {int(fired.sum())} of them), {len(tasks)} task questions (it flags "
          f"{sum(fires[t['question']] for t in tasks)}); greedy.\n\n"
          + head + "\n" + "\n".join(lines) + "\n")
    print()
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".part")
        tmp.write_text(md)
        tmp.replace(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
