"""What a second decoding thread does to llama.cpp's speed in one process (docs/methods.md, "One
decoding thread"): greedy plain replies on one worker thread, then on the main thread, then on
the worker again; tok/s of each.

    .venv/bin/python scripts/decode_threads.py [--model smollm2-135m-instruct] [--tokens 192]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, models  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=192)
    args = ap.parse_args()
    worker = ThreadPoolExecutor(1)
    model = worker.submit(api.load_model, str(models.resolve(args.model))).result()
    greedy = api.sampling_config(temperature=0)

    def speed() -> float:
        return api.generate(model, PROMPT, api.Steering(None, ()), greedy, max_tokens=args.tokens).tokens_per_second

    for where, run in (("worker thread", lambda: worker.submit(speed).result()), ("worker thread", None),
                       ("main thread", speed), ("worker thread again", lambda: worker.submit(speed).result()),
                       ("worker thread again", None)):
        run = run or (lambda: worker.submit(speed).result())
        print(f"{args.model}: {where:<20} {run():6.1f} tok/s")


if __name__ == "__main__":
    main()
