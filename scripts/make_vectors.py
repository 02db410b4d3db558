"""Extract the difference-of-means vectors shipped in vectors/<model>/ (happy-sad.gguf, and
lowercase-mean.gguf and uppercase-mean.gguf, named for their method: the shipped lowercase.gguf and
uppercase.gguf are the rewrite vectors, which work better) from the datasets in vectors/datasets/,
and print a greedy sample (plain, and steered at the suggested scale and its negative) for each.
With --instructions, the instruction vectors in vectors/<model>/<type>.gguf instead: lowercase and
uppercase as rewrite-contrast vectors (localsteer/rewrite.py; strength chosen on the validation split),
the other types as Stolfo instruction vectors (one layer chosen on the validation split); prints the
validation accuracy per candidate.

    .venv/bin/python scripts/make_vectors.py [--models smollm2-135m-instruct,...] [--force]
    .venv/bin/python scripts/make_vectors.py --instructions [--types lowercase,json] [--models ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api  # noqa: E402

DATASETS = {"happy-sad": "How was your weekend?", "uppercase": "Describe the ocean.",
            "lowercase": "Describe the ocean."}
OUT_NAME = {"happy-sad": "happy-sad", "uppercase": "uppercase-mean", "lowercase": "lowercase-mean"}
REWRITE = {"lowercase": "lower", "uppercase": "upper"}
MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"


def sample(model, prompt, steering):
    r = api.generate(model, prompt, steering, sampling=api.sampling_config(temperature=0), max_tokens=40)
    return r.text.replace("\n", " ")[:160]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--instructions", action="store_true")
    ap.add_argument("--types", default="lowercase,uppercase,json,include_word,exclude_word,short,no_commas")
    args = ap.parse_args()
    if args.instructions:
        for name in args.models.split(","):
            model = api.load_model(name)
            for itype in args.types.split(","):
                out = ROOT / "vectors" / name / f"{itype}.gguf"
                if out.exists() and not args.force:
                    continue
                dataset = ROOT / "vectors" / "datasets" / "instructions" / f"{itype}.jsonl"
                if itype in REWRITE:
                    res = api.extract_rewrite_vector(model, dataset, REWRITE[itype])
                    res.vector.save(out, force=True)
                    print(f"{name} {itype}: rewrite-{REWRITE[itype]}, strength x{res.scale:g}, validation "
                          "accuracy " + " ".join(f"x{s.scale:g}:{s.accuracy:.0%}" for s in res.scores)
                          + f" ({res.seconds:.0f} s)", flush=True)
                    continue
                res = api.extract_instruction_vector(model, dataset)
                res.vector.save(out, force=True)
                print(f"{name} {itype}: layer {res.layer}, weight {res.weight:.2f}, validation accuracy "
                      + " ".join(f"{s.layer}:{s.accuracy:.0%}" for s in res.scores)
                      + f" ({res.seconds:.0f} s)", flush=True)
            model.close()
        return
    for name in args.models.split(","):
        model = api.load_model(name)
        for ds, prompt in DATASETS.items():
            out = ROOT / "vectors" / name / f"{OUT_NAME[ds]}.gguf"
            if out.exists() and not args.force:
                vec = api.load_vector(out)
            else:
                pairs = api.load_pairs(ROOT / "vectors" / "datasets" / f"{ds}.jsonl")
                res = api.extract_vector(model, pairs, method="mean", dataset_name=f"{ds}.jsonl")
                vec = res.vector
                vec.save(out, force=True)
            layers = vec.suggested_layers
            print(f"== {name} / {ds}: layers {vec.meta['layers']}, scale {vec.suggested_scale}")
            print(f"   plain : {sample(model, prompt, api.Steering(None, ()))}")
            for sign in (1, -1):
                st = api.Steering(vec.only_layers(layers) * (sign * vec.suggested_scale), layers)
                print(f"   {'+' if sign > 0 else '-'}steer: {sample(model, prompt, st)}")
        model.close()


if __name__ == "__main__":
    main()
