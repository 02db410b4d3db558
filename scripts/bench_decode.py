"""Decoding speed with a control vector vs without, on the same model, prompt and machine.

    .venv/bin/python scripts/bench_decode.py [--model qwen2.5-coder-0.5b-instruct] [--tokens 128]

Runs are interleaved and repeated; prints median tokens/s (generation only, prompt excluded)
and the ratio steered / plain (goal: >= 0.97).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api  # noqa: E402
from localsteer.steer import Steerer  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def gen_speed(steerer: Steerer, prompt: list[int], n: int) -> float:
    """Tokens/s between the first and the last generated token (prompt processing excluded)."""
    times = []
    for _ in steerer.generate(prompt, n, api.sampling_config(temperature=0)):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = api.load_model(args.model)
    steering = api.steering_from_specs(model, [f"{ROOT}/vectors/{args.model}/uppercase-mean.gguf"])
    vec, layers = steering.vector, list(steering.layers)
    prompt = api.chat_prompt(model, PROMPT)
    plain = Steerer(model, details=False)
    steered = Steerer(model, vec, layers, details=False)
    gen_speed(plain, prompt, 8)  # warm-up
    speeds = {"plain": [], "steered": []}
    for _ in range(args.repeats):
        speeds["plain"].append(gen_speed(plain, prompt, args.tokens))
        speeds["steered"].append(gen_speed(steered, prompt, args.tokens))
    p, s = statistics.median(speeds["plain"]), statistics.median(speeds["steered"])
    print(f"model {args.model}, {args.tokens} tokens greedy, shipped uppercase-mean vector on layers "
          f"{layers[0]}-{layers[-1]}, "
          f"median of {args.repeats}")
    print(f"{'plain tok/s':>12}{'steered tok/s':>15}{'ratio':>8}")
    print(f"{p:>12.1f}{s:>15.1f}{s / p:>8.3f}")


if __name__ == "__main__":
    main()
