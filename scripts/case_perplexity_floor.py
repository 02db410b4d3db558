"""How probable is a reply in lowercase (or capitals) to the plain model, whoever writes it?

For the test prompts of the lowercase instruction set (no instruction in the prompt): the plain
model's own greedy replies, and the same replies lowercased and in capitals, each scored by the
plain model. The median perplexity of each is printed, with its ratio to the replies as written.
No case vector can write a reply that says the same in lowercase with a lower perplexity than the
lowercased plain reply: that is the floor the eval's perplexity target meets for case vectors.

These texts are tokenized afresh before scoring, while `localsteer eval` scores the tokens a reply
was generated as, and `recase` writes some words in pieces the tokenizer would not choose (" to"
"ky" "o"). With `--vector` the script also generates the eval's replies for one steered setting
(a shipped instruction vector or a file, at `--scale`, dynamic rejection as given) and scores
them both ways, to tell how much of the gap to the floor is the pieces:

    .venv/bin/python scripts/case_perplexity_floor.py [--models qwen2.5-coder-0.5b-instruct,...] [-n 32]
    .venv/bin/python scripts/case_perplexity_floor.py --vector lowercase --scale 4 --reject-minp 0.6 --reject-fold recase
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, verify  # noqa: E402
from localsteer.importance import importance_order  # noqa: E402
from localsteer.measure import perplexity  # noqa: E402
from localsteer.models import quick_fingerprint  # noqa: E402
from localsteer.sampling import Sampling  # noqa: E402
from localsteer.steer import Rejection, Steerer  # noqa: E402
from localsteer.vector import ControlVector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("-n", "--max-tokens", type=int, default=32)
    ap.add_argument("--vector", default=None, help="an instruction type (its shipped vector) or a vector file")
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--reject-topk", type=int, default=20)
    ap.add_argument("--reject-minp", type=float, default=0.0)
    ap.add_argument("--reject-fold", default="recase")
    args = ap.parse_args()
    for name in args.models.split(",") if args.vector else ():
        if not vector_path(args.vector, name).is_file():  # before any model is loaded
            sys.exit(f"error: no vector file {args.vector}, nor a shipped {args.vector} vector for {name}")
    items = verify.split(verify.load_instruction_set(ROOT / "vectors" / "datasets" / "instructions" / "lowercase.jsonl"),
                         "test")
    print(f"{'model':<30}{'replies':>8}{'as written':>12}{'lowercased':>16}{'in capitals':>16}")
    for name in args.models.split(","):
        model = api.load_model(name)
        st = Steerer(model)
        ppl: dict[str, list[float]] = {"as written": [], "lowercased": [], "in capitals": []}
        try:
            for it in items:
                prompt = model.user_prompt(it["prompt"])
                body = [e.token for e in st.generate(prompt, args.max_tokens, Sampling(temperature=0))
                        if not model.is_eog(e.token)]
                text = model.detokenize(body)
                for key, t in (("as written", text), ("lowercased", text.lower()), ("in capitals", text.upper())):
                    toks = model.tokenize(t, special=False)
                    ppl[key].append(perplexity(model, prompt, toks))
        finally:
            st.close()
        med = {k: statistics.median(v) for k, v in ppl.items()}
        base = med["as written"]
        print(f"{name:<30}{len(items):>8}{base:>12.2f}" + "".join(
            f"{med[k]:>9.2f} ({med[k] / base:.1f}x)" for k in ("lowercased", "in capitals")))
        if args.vector:
            steered_replies(model, name, items, args, base)


def vector_path(spec: str, name: str) -> Path:
    """A vector file, or the shipped instruction vector of that type for the model."""
    path = Path(spec)
    return path if path.is_file() else ROOT / "vectors" / name / f"{spec}.gguf"


def steered_replies(model, name: str, items, args, base: float) -> None:
    """The eval's replies for one steered setting (as its `over+rej` cell makes them), scored as
    generated and as text tokenized afresh."""
    path = vector_path(args.vector, name)
    vector = ControlVector.load(path) * args.scale
    layers = list(vector.layers)
    rejection = Rejection(topk=args.reject_topk, minp=args.reject_minp, fold=args.reject_fold)
    order = importance_order(model, vector, layers, quick_fingerprint(model.path))
    st = Steerer(model, vector, layers, rejection, order, details=False)
    as_generated, as_text = [], []
    try:
        for it in items:
            prompt = model.user_prompt(it["prompt"])
            body = [e.token for e in st.generate(prompt, args.max_tokens, Sampling(temperature=0))
                    if not model.is_eog(e.token)]
            as_generated.append(perplexity(model, prompt, body))
            as_text.append(perplexity(model, prompt, model.tokenize(model.detokenize(body), special=False)))
    finally:
        st.close()
    g, t = statistics.median(as_generated), statistics.median(as_text)
    print(f"  {path.name} x{args.scale:g}, rejection top-{args.reject_topk} min-p {args.reject_minp:g} "
          f"{args.reject_fold}: median perplexity {g:.2f} ({g / base:.1f}x) as generated, "
          f"{t:.2f} ({t / base:.1f}x) as text tokenized afresh")


if __name__ == "__main__":
    main()
