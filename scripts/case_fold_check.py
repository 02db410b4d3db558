"""Greedy validation replies with a vector file at several scales, with and without dynamic
rejection (exact or case-folded plausibility): pass / fluent counts and two samples.

    .venv/bin/python scripts/case_fold_check.py qwen2.5-coder-0.5b-instruct lowercase \
        vectors/qwen2.5-coder-0.5b-instruct/instructions/lowercase.gguf \
        '[[4,0],[4,20,0,"none"],[4,20,0,"case"]]'

Each config is [scale, top-k (0: no rejection), min-p, fold].
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
from localsteer.instruction import _chat
from localsteer.steer import Steerer, Rejection
from localsteer.sampling import Sampling
from localsteer.measure import perplexity
from localsteer.vector import ControlVector
from localsteer.evaluate import FLUENT_PPL
from localsteer.importance import importance_order

name, itype, vpath = sys.argv[1], sys.argv[2], sys.argv[3]
configs = json.loads(sys.argv[4])  # [scale, topk or 0]
split = sys.argv[5] if len(sys.argv) > 5 else "validation"
model = Model(models.resolve(name))
items = verify.load_instruction_set(ROOT / "vectors" / "datasets" / "instructions" / f"{itype}.jsonl")
spec = items[0]["check"]
val = verify.split(items, split)
base = ControlVector.load(vpath)
layers = list(base.layers)
vp = [_chat(model, i["prompt"]) for i in val]
g = Sampling(temperature=0)
for scale, topk, *mp in configs:
    v = base * scale
    rej = Rejection(topk=topk, minp=mp[0] if mp else 0.0, fold=mp[1] if len(mp) > 1 else "none") if topk else None
    order = importance_order(model, v, layers, models.quick_fingerprint(model.path)) if rej else None
    st = Steerer(model, v, layers, rej, order, details=False)
    ok = fl = 0; ppls = []; samples = []
    t0 = time.time()
    for p in vp:
        toks = [e.token for e in st.generate(p, 32, g)]
        body = [t for t in toks if not model.is_eog(t)]
        text = model.detokenize(body)
        ppl = perplexity(model, p, body) if body else 99
        ok += verify.check(spec, text); fl += verify.check(spec, text) and ppl <= FLUENT_PPL
        ppls.append(ppl); samples.append(text)
    st.close()
    print(f"x{scale} k={topk} minp={mp}: pass {ok}/{len(vp)} fluent {fl}/{len(vp)} ppl {np.median(ppls):.1f} ({time.time()-t0:.0f}s) | {samples[0][:60]!r} | {samples[1][:60]!r}", flush=True)
