"""Why the Stolfo instruction vector fails for lowercase on small models: steer the validation
prompts (no instruction) with the last-token difference of means at chosen layers and weight
multipliers, and print pass / fluent counts and a sample.

    .venv/bin/python scripts/sweep_instruction_vector.py qwen2.5-coder-0.5b-instruct lowercase \
        '[[[10],0],[[10],1],[[10],2],[[10],3],[[8],2],[[12],2],[[6,7,8,9,10,11,12,13,14],1],[[6,7,8,9,10,11,12,13,14],2],[[6,7,8,9,10,11,12,13,14],4]]'

Each config is [layers, multiplier]: the projection-rule vector of each layer, times multiplier / len(layers).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from localsteer import verify, models
from localsteer.runtime import Model
from localsteer.activations import collect
from localsteer.instruction import _chat, ALL_POSITIONS
from localsteer.steer import Steerer
from localsteer.sampling import Sampling
from localsteer.measure import perplexity
from localsteer.vector import ControlVector
from localsteer.evaluate import FLUENT_PPL

name, itype = sys.argv[1], sys.argv[2]
configs = json.loads(sys.argv[3])  # [[layers], mult] list
model = Model(models.resolve(name))
items = verify.load_instruction_set(ROOT / "vectors" / "datasets" / "instructions" / f"{itype}.jsonl")
spec = items[0]["check"]
train, val = verify.split(items, "train"), verify.split(items, "validation")
L = list(range(model.n_layer))
t0 = time.time()
pos_last = collect(model, [_chat(model, f"{i['prompt']} {i['instruction']}") for i in train], layers=L, last_n=1)
neg_prompts = [_chat(model, i["prompt"]) for i in train]
neg_all = collect(model, neg_prompts, layers=L, last_n=ALL_POSITIONS, skip_first=True)
neg_last = collect(model, neg_prompts, layers=L, last_n=1)
print(f"collect {time.time()-t0:.1f}s", flush=True)
diff = pos_last.mean(0) - neg_last.mean(0)   # (n_layer, n_embd)
unit = diff / np.linalg.norm(diff, axis=1, keepdims=True)
weight = np.array([np.mean(pos_last[:, l] @ unit[l]) - np.mean(neg_all[:, l] @ unit[l]) for l in L])
resid = np.linalg.norm(neg_all.mean(0), axis=1)
print("weights", np.round(weight, 1).tolist())
print("resid  ", np.round(resid, 1).tolist())
st = Steerer(model, details=False)
g = Sampling(temperature=0)
vp = [_chat(model, i["prompt"]) for i in val]
for layers, mult in configs:
    d = np.zeros((model.n_layer, model.n_embd), np.float32)
    for l in layers:
        d[l] = unit[l] * weight[l] * mult / len(layers)
    st.configure(ControlVector(d, model.arch) if mult else None, layers if mult else None)
    ok = fl = 0; ppls = []; sample = ""
    t0 = time.time()
    for p in vp:
        toks = [e.token for e in st.generate(p, 32, g)]
        body = [t for t in toks if not model.is_eog(t)]
        text = model.detokenize(body)
        ppl = perplexity(model, p, body) if body else 99
        ok += verify.check(spec, text); fl += verify.check(spec, text) and ppl <= FLUENT_PPL
        ppls.append(ppl); sample = sample or text
    print(f"{layers[0]}-{layers[-1]} x{mult}: pass {ok}/{len(vp)} fluent {fl}/{len(vp)} ppl {np.median(ppls):.1f} ({time.time()-t0:.0f}s) | {sample[:70]!r}", flush=True)
