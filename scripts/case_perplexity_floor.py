"""How probable is a reply in lowercase (or capitals) to the plain model, whoever writes it?

For the test prompts of the lowercase instruction set (no instruction in the prompt): the plain
model's own greedy replies, and the same replies lowercased and in capitals, each scored by the
plain model. The median perplexity of each is printed, with its ratio to the replies as written.
No case vector can write a reply that says the same in lowercase with a lower perplexity than the
lowercased plain reply: that is the floor the eval's perplexity target meets for case vectors.

    .venv/bin/python scripts/case_perplexity_floor.py [--models qwen2.5-coder-0.5b-instruct,...] [-n 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, verify  # noqa: E402
from localsteer.measure import perplexity  # noqa: E402
from localsteer.sampling import Sampling  # noqa: E402
from localsteer.steer import Steerer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("-n", "--max-tokens", type=int, default=32)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
