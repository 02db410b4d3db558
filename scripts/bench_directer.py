"""DIRECTER's speed against plain decoding, in one run on the same machine, model load and prompts:

  plain      greedy decoding of the same model, one token per decode (flash attention off, as
             DIRECTER runs)
  directer   DIRECTER on the instruction appended to each prompt (alpha 100, p 0.5, 10 trials), greedy

    .venv/bin/python scripts/bench_directer.py [--model qwen2.5-coder-0.5b-instruct] [--tokens 96]

tok/s is (n - 1) / (T(n) - T(1)) per prompt (T(k): wall time from the call to the k-th token),
so prompt processing cancels out; the mean over the prompts. Beside the ratio it prints what
bounds it: the share of tokens skipped (no steered pass needed), accepted at once, weakened and
fallen back to plain, the steered passes per token, and the cost of a decode of two rows
relative to one on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api  # noqa: E402
from localsteer.directer import InstructionSteerer, find_span  # noqa: E402
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
    args = ap.parse_args()
    try:
        model = api.load_model(args.model)
    except api.LocalsteerError as e:
        sys.exit(f"bench_directer: {e}")
    greedy = api.sampling_config(temperature=0)
    plain_speed, directer_speed, counts, trials = [], [], {}, []
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

        steerer = InstructionSteerer(model, span, api.Directer())

        def directer(k: int) -> list[int]:
            reply = run(steerer, tokens, k, greedy)
            if k > 1:
                for e in reply.events:
                    counts[e.status.value] = counts.get(e.status.value, 0) + 1
                    trials.append(e.rounds + (e.status.value != "skipped"))
            return reply.tokens

        try:
            plain_speed.append(timed(plain, args.tokens))
            directer_speed.append(timed(directer, args.tokens))
        finally:
            steerer.close()
    p, d = float(np.mean(plain_speed)), float(np.mean(directer_speed))
    n = sum(counts.values())
    cost = two_row_cost(model, model.tokenize(model.apply_chat_template([{"role": "user", "content": PROMPTS[0][0]}])))
    print(f"model {args.model}, {len(PROMPTS)} prompts x {args.tokens} tokens greedy, "
          f"{api.backend_devices()[0][1] if api.backend_devices() else 'CPU'}")
    print(f"  plain     {p:6.1f} tok/s")
    print(f"  directer  {d:6.1f} tok/s   {d / p:.2f} x plain")
    passes = float(np.mean(trials))
    print("  tokens: " + ", ".join(f"{k} {v / n:.0%}" for k, v in sorted(counts.items()))
          + f"; steered passes per token {passes:.2f} (skipped: none; else one per trial)")
    print(f"  greedy DIRECTER decodes the plain row, then the steered row only where the skip test fails: "
          f"{1 + passes:.2f} one-row decodes a token, a bound of {1 / (1 + passes):.2f} x plain if each costs "
          "one plain decode")
    print(f"  a decode of 2 rows costs {cost:.2f} x one row here (the one-decode-of-two-rows design, kept for "
          f"sampling, would be bound at {1 / cost:.2f} x plain)")


if __name__ == "__main__":
    main()
