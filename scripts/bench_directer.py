"""DIRECTER's speed against plain decoding, in one run on the same machine, model load and prompts:

  plain      greedy decoding of the same model, one token per decode (flash attention off, as
             DIRECTER runs)
  split      DIRECTER on the instruction appended to each prompt (alpha 100, p 0.5, 10 trials),
             greedy: per token the plain row, then the steered row where the skip test fails
  joint      the same with each token's plain and steered rows in one decode of two
  auto       the loop the machine's calibration favours at the share of tokens skipped so far

    .venv/bin/python scripts/bench_directer.py [--model qwen2.5-coder-0.5b-instruct] [--tokens 96]
                                               [--batch auto|together|one-by-one]

tok/s is (n - 1) / (T(n) - T(1)) per prompt (T(k): wall time from the call to the k-th token),
so prompt processing cancels out; the mean over the prompts. Beside the ratio it prints what
bounds it: the share of tokens skipped (no steered pass needed), accepted at once, weakened and
fallen back to plain, the steered passes per token (of the split loop), the cost of a decode of
two rows relative to one on this machine, and the calibration's verdict.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, calibrate  # noqa: E402
from localsteer.directer import BATCHES, InstructionSteerer, find_span  # noqa: E402
from localsteer.reply import run  # noqa: E402
import numpy as np  # noqa: E402  (after localsteer, which loads llama.cpp first)

PROMPTS = [("Describe how a lighthouse works.", "Include the word 'beacon' in your answer."),
           ("Explain why the sky is blue.", "Do not use any commas in your answer."),
           ("Give advice to a new gardener.", "Answer in exactly three sentences."),
           ("What makes a good neighbor?", "End your reply with the phrase 'That is all.'")]


def timed(generate, n: int) -> float:
    """tok/s over tokens 2..n of `generate(k)` (which returns the tokens of a k-token reply)."""
    t1 = time.perf_counter()
    generate(1)
    one = time.perf_counter() - t1
    t0 = time.perf_counter()
    toks = generate(n)
    total = time.perf_counter() - t0
    return (len(toks) - 1) / max(1e-9, total - one)


def two_row_cost(model, tokens: list[int], reps: int = 20) -> float:
    """Seconds of a two-row decode over a one-row decode, after `tokens` (flash attention off)."""
    with model.context(n_ctx=1024, n_seq_max=2, flash_attn=False) as ctx:
        ctx.decode_sequence(tokens, 0)
        ctx.share(0, 1)
        n = len(tokens)

        def once(rows: int) -> float:
            t0 = time.perf_counter()
            for _ in range(reps):
                ctx.decode([tokens[-1]] * rows, [n] * rows, list(range(rows)), [True] * rows)
                ctx.remove(-1, n, -1)
            return time.perf_counter() - t0

        once(1)
        return min(once(2) for _ in range(3)) / min(once(1) for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--batch", choices=BATCHES, default="auto",
                    help="a token's further steered rows (ranking, weakened trials) in one decode or one by one")
    args = ap.parse_args()
    try:
        model = api.load_model(args.model)
    except api.LocalsteerError as e:
        sys.exit(f"bench_directer: {e}")
    greedy = api.sampling_config(temperature=0)
    calibrate.costs(model)  # measured now (once per machine and model) rather than inside a timed reply
    loops = ("split", "joint", "auto")
    speed: dict[str, list[float]] = {"plain": [], **{loop: [] for loop in loops}}
    counts, trials, took = {}, [], []
    auto_skipped = 0.0  # auto's running share of skipped tokens, carried from prompt to prompt
    for prompt, instruction in PROMPTS:
        text = model.apply_chat_template([{"role": "user", "content": f"{prompt} {instruction}"}])
        tokens = model.tokenize(text)
        span = find_span(model, tokens, text, instruction)

        def plain(k: int) -> list[int]:
            out = []
            with model.context(n_ctx=1024, flash_attn=False) as ctx:
                ctx.decode_sequence(tokens, 0)
                for _ in range(k):
                    out.append(int(np.argmax(ctx.logits())))
                    ctx.decode([out[-1]], [len(tokens) + len(out) - 1], [0], [True])
            return out

        speed["plain"].append(timed(plain, args.tokens))
        for loop in loops:
            steerer = InstructionSteerer(model, span, api.Directer(), loop=loop, batch=args.batch)
            if loop == "auto":
                steerer.skipped = auto_skipped  # the share the earlier prompts' replies skipped

            def directer(k: int) -> list[int]:
                if loop == "auto" and k > 1:
                    took.append("joint" if steerer.joint() else "split")
                reply = run(steerer, tokens, k, greedy)
                if k > 1 and loop == "split":
                    for e in reply.events:
                        counts[e.status.value] = counts.get(e.status.value, 0) + 1
                        trials.append(e.rounds + (e.status.value != "skipped"))
                return reply.tokens

            try:
                speed[loop].append(timed(directer, args.tokens))
            finally:
                steerer.close()
            if loop == "auto":
                auto_skipped = steerer.skipped
    p = float(np.mean(speed["plain"]))
    n = sum(counts.values())
    cost = two_row_cost(model, model.tokenize(model.apply_chat_template([{"role": "user", "content": PROMPTS[0][0]}])))
    c = calibrate.costs(model)
    print(f"model {args.model}, {len(PROMPTS)} prompts x {args.tokens} tokens greedy, batch {args.batch}, "
          f"{api.backend_devices()[0][1] if api.backend_devices() else 'CPU'}")
    print(f"  plain     {p:6.1f} tok/s")
    for loop in loops:
        d = float(np.mean(speed[loop]))
        note = f"   (took: {', '.join(took)})" if loop == "auto" else ""
        print(f"  {loop:9} {d:6.1f} tok/s   {d / p:.2f} x plain{note}")
    passes = float(np.mean(trials))
    skipped = counts.get("skipped", 0) / n
    print("  tokens: " + ", ".join(f"{k} {v / n:.0%}" for k, v in sorted(counts.items()))
          + f"; steered passes per token {passes:.2f} (skipped: none; else one per trial)")
    print(f"  split decodes the plain row, then the steered row only where the skip test fails: "
          f"{1 + passes:.2f} one-row decodes a token, a bound of {1 / (1 + passes):.2f} x plain if each costs "
          "one plain decode")
    print(f"  joint decodes both rows in one: a decode of 2 rows costs {cost:.2f} x one row here, a bound of "
          f"{1 / (cost + passes - (1 - skipped)):.2f} x plain with the same trials")
    print(f"  calibration: {c.describe()}")


if __name__ == "__main__":
    main()
