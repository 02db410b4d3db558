"""Do llama.cpp's kernels give a token the same logits whatever the size of its batch?

For each model: the logits of the same tokens decoded one at a time, in pairs (previous token
decoded again), and in batches of 3, 5 and 8, compared with the pairs. Prints the largest
absolute logit difference; 0.0 means bit-identical. This is why dynamic rejection decodes the
plain side in batches of 2-3 tokens only (localsteer/steer.py, `_Run._plain_append`).

    .venv/bin/python scripts/batch_invariance.py [--models smollm2-135m-instruct,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api  # noqa: E402
import numpy as np  # noqa: E402  (after localsteer, which loads llama.cpp first)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    args = ap.parse_args()
    print(f"{'model':<30}{'single':>8}" + "".join(f"{'batch ' + str(n):>9}" for n in (3, 5, 8)))
    for name in args.models.split(","):
        model = api.load_model(name)
        prompt = api.chat_prompt(model, "Write a short story about a lighthouse keeper.")
        seq = list(range(1000, 1008))
        p = len(prompt)
        ctx = model.context(n_ctx=1024)
        ctx.decode_sequence(prompt, 0)
        single = []
        for j, t in enumerate(seq):
            ctx.decode([t], [p + j], [0], [True])
            single.append(ctx.logits())
        pairs, prev = [], prompt[-1]
        for j, t in enumerate(seq):
            ctx.remove(0, p + j - 1, -1)
            ctx.decode([prev, t], [p + j - 1, p + j], [0, 0], [False, True])
            pairs.append(ctx.logits())
            prev = t
        pairs = np.stack(pairs)
        cells = [float(np.abs(np.stack(single) - pairs).max())]
        for n in (3, 5, 8):
            ctx.remove(0, p, -1)
            ctx.decode(seq[:n], range(p, p + n), [0] * n, [True] * n)
            cells.append(float(np.abs(ctx.logits_rows(n) - pairs[:n]).max()))
        print(f"{name:<30}" + "".join(f"{c:>9.3f}" for c in cells))
        ctx.close()
        model.close()


if __name__ == "__main__":
    main()
