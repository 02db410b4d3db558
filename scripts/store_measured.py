"""Store in each shipped instruction vector what the eval grid measured it to do
(`localsteer.measured`, shown by `localsteer inspect` and in the chat's panel): the share of
held-out prompts whose reply follows the instruction when steered alone, against plain, with
rejection, the task fidelity and perplexity, and its benign KL. Only the metadata changes.

    .venv/bin/python scripts/store_measured.py [docs/results/eval/results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api  # noqa: E402


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "results" / "eval" / "results.json")
    data = json.loads(results.read_text())
    cells, kls = data["cells"], data.get("benign_kl", {})
    n_tokens = data["settings"]["max_tokens"]
    for key, steer in sorted(cells.items()):
        model, itype, condition = key.split("|")
        if condition != "steer" or itype.startswith("joint "):
            continue
        path = ROOT / "vectors" / model / f"{itype}.gguf"
        if not path.is_file():
            continue
        plain, rej = cells.get(f"{model}|{itype}|plain"), cells.get(f"{model}|{itype}|steer+rej")
        text = (f"eval grid (docs/results/eval), {steer['n']} held-out prompts, greedy, {n_tokens} tokens: steered, "
                f"{steer['accuracy']:.0%} of replies follow '{itype}' fluently (plain {plain['accuracy']:.0%}"
                + (f", with rejection {rej['accuracy']:.0%}" if rej else "")
                + f"); task fidelity {steer['fidelity']:.0%}, perplexity {steer['perplexity']:.1f}")
        kl = kls.get(f"{model}|{itype}", {}).get("steer")
        if kl is not None:
            text += f"; benign KL {kl:.2f}"
        vector = api.load_vector(path)
        if vector.meta.get("measured") == text:
            continue
        vector.with_meta(measured=text).save(path, force=True)
        print(f"{path.relative_to(ROOT)}: {text}")


if __name__ == "__main__":
    main()
