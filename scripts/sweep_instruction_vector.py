"""Why the Stolfo instruction vector fails for lowercase on small models: steer the validation
prompts (no instruction) with the last-token difference of means at chosen layers and weight
multipliers, and print pass / fluent counts and a sample.

    .venv/bin/python scripts/sweep_instruction_vector.py qwen2.5-coder-0.5b-instruct lowercase \\
        '[[[10],0],[[10],1],[[10],2],[[10],3],[[8],2],[[12],2],[[6,7,8,9,10,11,12,13,14],1],[[6,7,8,9,10,11,12,13,14],2],[[6,7,8,9,10,11,12,13,14],4]]'

Each config is [layers, multiplier]: the projection-rule vector of each layer, times multiplier / len(layers).
"""

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import models, verify  # noqa: E402
from localsteer.activations import collect  # noqa: E402
from localsteer.eval.grid import score_replies  # noqa: E402
from localsteer.instruction import ALL_POSITIONS  # noqa: E402
from localsteer.runtime import Model  # noqa: E402
from localsteer.steer import Steerer  # noqa: E402
from localsteer.vector import ControlVector  # noqa: E402
import numpy as np  # noqa: E402  (after localsteer, which loads llama.cpp first)


def main() -> None:
    name, itype = sys.argv[1], sys.argv[2]
    configs = json.loads(sys.argv[3])
    model = Model(models.resolve(name))
    items = verify.load_instruction_set(ROOT / "vectors" / "datasets" / "instructions" / f"{itype}.jsonl")
    train, val = verify.split(items, "train"), verify.split(items, "validation")
    every = list(range(model.n_layer))
    t0 = time.time()
    pos_last = collect(model, [model.user_prompt(f"{i['prompt']} {i['instruction']}") for i in train],
                       layers=every, last_n=1)
    neg_prompts = [model.user_prompt(i["prompt"]) for i in train]
    neg_all = collect(model, neg_prompts, layers=every, last_n=ALL_POSITIONS, skip_first=True)
    neg_last = collect(model, neg_prompts, layers=every, last_n=1)
    print(f"collect {time.time() - t0:.1f}s", flush=True)
    diff = pos_last.mean(0) - neg_last.mean(0)  # (n_layer, n_embd)
    unit = diff / np.linalg.norm(diff, axis=1, keepdims=True)
    weight = np.array([np.mean(pos_last[:, il] @ unit[il]) - np.mean(neg_all[:, il] @ unit[il]) for il in every])
    print("weights", np.round(weight, 1).tolist())
    print("resid  ", np.round(np.linalg.norm(neg_all.mean(0), axis=1), 1).tolist())
    st = Steerer(model, details=False)
    users = [i["prompt"] for i in val]
    for layers, mult in configs:
        d = np.zeros((model.n_layer, model.n_embd), np.float32)
        for il in layers:
            d[il] = unit[il] * weight[il] * mult / len(layers)
        st.configure(ControlVector(d, model.arch) if mult else None, layers if mult else None)
        t0 = time.time()
        r = score_replies(model, st, users, [items[0]["check"]], 32)
        print(f"{layers[0]}-{layers[-1]} x{mult}: pass {r.passes}/{len(users)} fluent {r.fluent}/{len(users)} "
              f"ppl {statistics.median(r.perplexities):.1f} ({time.time() - t0:.0f}s) | {r.texts[0][:70]!r}",
              flush=True)
    st.close()


if __name__ == "__main__":
    main()
