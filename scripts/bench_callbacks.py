"""What localsteer's own work costs around llama.cpp's decodes, in one run on the same machine:

  decode       a one-row decode of the model after a chat prompt (flash attention off, as
               DIRECTER runs): without an eval callback, with DIRECTER's callbacks idle (a plain
               row: nothing steered), and with the instruction's keys scaled in every layer
               (a steered row); the best of 5 rounds of --reps decodes each
  top-n        the 5 and the 2 largest of the vocabulary's logits: `sampling.top_indices`
               against numpy's vocabulary-wide `argpartition` (the skip test and the events)

    .venv/bin/python scripts/bench_callbacks.py [--model qwen2.5-coder-0.5b-instruct] [--reps 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, runtime  # noqa: E402
from localsteer.sampling import top_indices  # noqa: E402
import numpy as np  # noqa: E402  (after localsteer, which loads llama.cpp first)

PROMPT = "Explain why the sky is blue. Do not use any commas in your answer."


def decode_ms(model, tokens: list[int], reps: int, capture=None, steer=None) -> float:
    """Milliseconds of a one-row decode after `tokens`, best of 5 rounds of `reps`."""
    with model.context(n_ctx=1024, flash_attn=False, capture=capture) as ctx:
        ctx.decode_sequence(tokens, 0)
        if steer:
            steer()
        n, best = len(tokens), []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                ctx.decode([tokens[-1]], [n], [0], [True])
                ctx.remove(0, n, -1)
            best.append((time.perf_counter() - t0) / reps)
        return 1e3 * min(best)


def best_of(f, reps: int = 300) -> float:
    """Milliseconds of one call of `f`, best of 5 rounds."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        times.append((time.perf_counter() - t0) / reps)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    try:
        model = api.load_model(args.model)
    except api.LocalsteerError as e:
        sys.exit(f"bench_callbacks: {e}")
    tokens = model.tokenize(model.apply_chat_template([{"role": "user", "content": PROMPT}]))
    keys = runtime.KeyScale()
    steered = runtime.Callbacks(keys, runtime.RowsSteer())
    none = decode_ms(model, tokens, args.reps)
    idle = decode_ms(model, tokens, args.reps, runtime.Callbacks(runtime.KeyScale(), runtime.RowsSteer()))
    scaled = decode_ms(model, tokens, args.reps, steered,
                       lambda: keys.set(range(model.n_layer), range(5, 15), 100.0, [0]))
    print(f"model {args.model}, {model.n_vocab} tokens of vocabulary, "
          f"{api.backend_devices()[0][1] if api.backend_devices() else 'CPU'}")
    print(f"  one-row decode, no callback      {none:6.2f} ms")
    print(f"  DIRECTER's callbacks, idle       {idle:6.2f} ms   {idle / none:.3f} x no callback")
    print(f"  keys scaled in all {model.n_layer} layers    {scaled:6.2f} ms   {scaled / none:.3f} x no callback")
    logits = np.random.default_rng(0).standard_normal(model.n_vocab).astype(np.float32)
    for n in (5, 2):
        mine = best_of(lambda: top_indices(logits, n))
        numpy = best_of(lambda: np.argpartition(-logits, n)[:n])
        print(f"  top {n}: top_indices {mine:.3f} ms, argpartition {numpy:.3f} ms   "
              f"{numpy / mine:.1f} x faster ({100 * (numpy - mine) / none:.1f}% of a decode saved)")


if __name__ == "__main__":
    main()
