"""How much does a model's decoding speed depend on the load? Loads the same GGUF model several
times in one process (all kept loaded) and times single-token greedy decodes on each.

On these machines the loads differ by up to 10-15% (most likely by where their repacked weights
land in memory): a speed ratio between two loads carries that noise, a ratio between two ways of
decoding on one load does not. scripts/bench_rejection.py prints both.

    .venv/bin/python scripts/load_variance.py [--model qwen2.5-coder-1.5b-instruct] [--loads 3]
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
from localsteer.errors import LocalsteerError  # noqa: E402


def ms_per_token(model, prompt: list[int], n: int = 32) -> float:
    ctx = model.context(n_ctx=1024)
    ctx.decode_sequence(prompt, 0)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        ctx.decode([100 + i], [len(prompt) + i], [0], [True])
        times.append(time.perf_counter() - t0)
    ctx.close()
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--loads", type=int, default=3)
    args = ap.parse_args()
    loads = [api.load_model(args.model) for _ in range(args.loads)]
    prompt = api.chat_prompt(loads[0], "Write a long story about a lighthouse keeper and a storm.")
    for rep in range(2):
        cells = "  ".join(f"load {i + 1}: {ms_per_token(m, prompt):.1f}" for i, m in enumerate(loads))
        print(f"{args.model}, ms per token, pass {rep + 1}: {cells}")


if __name__ == "__main__":
    try:
        main()
    except LocalsteerError as e:
        sys.exit(f"error: {e}")
