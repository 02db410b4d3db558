"""The joint rejection loop's two rows against one-token decodes (docs/methods.md, "Identical
choices"): one context with a steered and a plain sequence (`runtime.RowSteer`), each token
decoded as a row of each, against a plain context and a steered one (llama.cpp's own control
vector) decoding one token at a time, and against the drafted loop's plain side (each token
decoded again with its predecessor, a batch of two). Prints the largest logit differences.

    .venv/bin/python scripts/joint_rows.py [--model qwen2.5-coder-0.5b-instruct] [--vector json:4] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, models  # noqa: E402
from localsteer.runtime import RowSteer  # noqa: E402
import numpy as np  # noqa: E402

TEXT = "Here is a JSON list of the items you asked for, with names and values"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vector", default="json:4")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model = api.load_model(str(models.resolve(args.model)))
    steering = api.steering_from_specs(model, [args.vector])
    vec, layers = steering.vector, list(steering.layers)
    prompt = api.chat_prompt(model, "List three fruits that are high in vitamin C.")
    ext = model.tokenize(TEXT)
    seq = list(prompt) + list(ext)

    def single(control: bool) -> list:
        c = model.context(n_ctx=4096, n_threads=args.threads)
        if control:
            c.set_control(vec.directions, min(layers), max(layers))
        c.decode_sequence(prompt, 0)
        out = []
        for i, t in enumerate(ext):
            c.decode([t], [len(prompt) + i], [0], [True])
            out.append(c.logits())
        return out

    def pairs() -> list:
        c = model.context(n_ctx=4096, n_threads=args.threads)
        c.decode_sequence(prompt[:-1], 0)
        out = []
        for i, t in enumerate(ext):
            pos = len(prompt) + i
            c.remove(0, pos - 1, -1)
            c.decode([seq[pos - 1], t], [pos - 1, pos], [0, 0], [False, True])
            out.append(c.logits())
        return out

    rows = RowSteer()
    ctx = model.context(n_ctx=8192, n_seq_max=2, capture=rows, n_threads=args.threads)
    rows.set(vec.directions, layers)
    rows.rows = None
    ctx.decode_sequence(prompt, 0, seq_id=0)
    rows.rows = []
    ctx.decode_sequence(prompt, 0, seq_id=1)
    rows.rows = [0]
    steered, plain = [], []
    for i, t in enumerate(ext):
        ctx.decode([t, t], [len(prompt) + i] * 2, [0, 1], [True, True])
        steered.append(ctx.logits(0))
        plain.append(ctx.logits(1))

    def diff(a, b) -> float:
        return max(float(np.abs(x - y).max()) for x, y in zip(a, b))

    print(f"{args.model}, {args.vector}, {len(ext)} tokens: largest logit difference")
    print(f"  joint steered row vs one-token decodes with llama.cpp's control vector  {diff(steered, single(True)):.3g}")
    print(f"  joint plain row vs one-token plain decodes                               {diff(plain, single(False)):.3g}")
    print(f"  joint plain row vs the drafted loop's plain side (pairs)                 {diff(plain, pairs()):.3g}")


if __name__ == "__main__":
    main()
