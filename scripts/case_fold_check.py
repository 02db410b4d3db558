"""Greedy validation replies with a vector file at several scales, with and without dynamic
rejection (exact or case-folded plausibility): pass / fluent counts and two samples.

    .venv/bin/python scripts/case_fold_check.py qwen2.5-coder-0.5b-instruct lowercase \\
        vectors/qwen2.5-coder-0.5b-instruct/lowercase.gguf \\
        '[[4,0],[4,20,0,"none"],[4,20,0,"case"]]' [validation|test]

Each config is [scale, top-k (0: no rejection), min-p, fold].
"""

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import models, verify  # noqa: E402
from localsteer.eval.grid import score_replies  # noqa: E402
from localsteer.importance import importance_order  # noqa: E402
from localsteer.runtime import Model  # noqa: E402
from localsteer.steer import Rejection, Steerer  # noqa: E402
from localsteer.vector import ControlVector  # noqa: E402


def main() -> None:
    name, itype, vpath = sys.argv[1], sys.argv[2], sys.argv[3]
    configs = json.loads(sys.argv[4])
    split = sys.argv[5] if len(sys.argv) > 5 else "validation"
    model = Model(models.resolve(name))
    items = verify.load_instruction_set(ROOT / "vectors" / "datasets" / "instructions" / f"{itype}.jsonl")
    users = [it["prompt"] for it in verify.split(items, split)]
    base = ControlVector.load(vpath)
    layers = list(base.layers)
    for scale, topk, *rest in configs:
        v = base * scale
        rej = (Rejection(topk=topk, minp=rest[0] if rest else 0.0, fold=rest[1] if len(rest) > 1 else "none")
               if topk else None)
        order = importance_order(model, v, layers, models.quick_fingerprint(model.path)) if rej else None
        st = Steerer(model, v, layers, rej, order, details=False)
        t0 = time.time()
        try:
            r = score_replies(model, st, users, [items[0]["check"]], 32)
        finally:
            st.close()
        print(f"x{scale} k={topk} {rest}: pass {r.passes}/{len(users)} fluent {r.fluent}/{len(users)} "
              f"ppl {statistics.median(r.perplexities):.1f} ({time.time() - t0:.0f}s) | "
              f"{r.texts[0][:60]!r} | {r.texts[1][:60]!r}", flush=True)


if __name__ == "__main__":
    main()
