"""Does dynamic rejection keep the steering effect while staying fluent? One table, made here.

For a strong uppercase vector on Qwen2.5-Coder-0.5B-Instruct (a scale at which plain steering
turns into gibberish), greedy replies to a few prompts without any instruction about case:
plain vs steered vs rejection at several top-k and recovery settings. Columns: the share of
uppercase letters (the steering effect), the plain model's perplexity of the reply (fluency),
the share of tokens not taken with full steering (rejection rate), and tokens/s.

    .venv/bin/python scripts/rejection_table.py [--scale 3] [--tokens 48] [--out docs/results/rejection.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api  # noqa: E402
from localsteer.measure import perplexity  # noqa: E402

MODEL = "qwen2.5-coder-0.5b-instruct"
PROMPTS = ["Describe the ocean.", "How was your weekend?", "What is the capital of France?",
           "Give me three tips for sleeping better.", "Explain what a noun is.",
           "Write a short note to a friend about a concert."]


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=3.0)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "rejection.md"))
    args = ap.parse_args()
    model = api.load_model(MODEL)
    vec_path = ROOT / "vectors" / MODEL / "uppercase-mean.gguf"
    steer = api.steering_from_specs(model, [f"{vec_path}:{args.scale}"])
    variants = [("plain", None, None), ("steered", steer, None)]
    for k in (5, 20, 50):
        for rec in ("reset", "hold"):
            variants.append((f"rejection k={k} {rec}", steer, api.rejection_config(k, recovery=rec)))
    greedy = api.sampling_config(temperature=0)
    rows, samples = [], {}
    for name, st, rej in variants:
        ups, ppls, rates, speeds, texts = [], [], [], [], []
        for p in PROMPTS:
            r = api.generate(model, p, st or api.Steering(None, ()), sampling=greedy,
                             max_tokens=args.tokens, rejection=rej)
            body = [t for t in r.tokens if not model.is_eog(t)]
            ups.append(upper_share(r.text))
            ppls.append(perplexity(model, api.chat_prompt(model, p), body))
            rates.append(1 - r.acceptance if st is not None else 0.0)
            speeds.append(r.tokens_per_second)
            texts.append(r.text)
        rows.append((name, statistics.mean(ups), statistics.median(ppls), statistics.mean(rates),
                     statistics.mean(speeds)))
        samples[name] = texts
        print(f"{name:<26} upper {rows[-1][1]:.0%}  ppl {rows[-1][2]:.1f}  rejected {rows[-1][3]:.0%}  "
              f"{rows[-1][4]:.1f} tok/s", flush=True)
    lines = [f"# Dynamic rejection on {MODEL}: uppercase vector at scale {args.scale:g}",
             "", f"Made by `scripts/rejection_table.py --scale {args.scale:g} --tokens {args.tokens}`; "
             f"greedy, {len(PROMPTS)} prompts with no instruction about case, {args.tokens} tokens max.", "",
             "| decoding | uppercase letters | perplexity (plain model, median) | tokens not fully steered | tok/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {u:.0%} | {p:.1f} | {r:.0%} | {s:.1f} |" for n, u, p, r, s in rows]
    lines += ["", "## Replies side by side", ""]
    shown = ["plain", "steered", "rejection k=20 reset", "rejection k=50 reset"]
    lines += ["| prompt | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for i, p in enumerate(PROMPTS):
        cells = [samples[n][i].replace("\n", " ").replace("|", "\\|")[:160] for n in shown]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
