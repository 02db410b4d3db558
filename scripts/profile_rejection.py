"""Where the time of a reply with rejection goes, beyond llama.cpp's decodes: the reply loop of
`localsteer generate` (`api.make_steerer` + `api.run_reply`, events with probabilities) under
cProfile, on one model, its contexts already made (as from the second reply of a chat), and
what its decodes alone cost.

    .venv/bin/python scripts/profile_rejection.py [--model smollm2-135m-instruct] [--tokens 128]
        [--vector happy-sad:2] [--topk 20] [--top 15]

Prints the profile's top lines by own time (tottime), then the reply's seconds without the
profiler, the seconds inside llama_decode (timed around each call) and what is left, as a share
of the decodes (goal: at most 5%).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, models, runtime  # noqa: E402
from localsteer.errors import LocalsteerError  # noqa: E402
from localsteer.runtime import default_threads  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--vector", default="happy-sad:2", help="a shipped vector NAME[:SCALE] of the model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--topk", type=int, default=20)
    ap.add_argument("--loop", default="auto")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top", type=int, default=15, help="profile lines to print")
    args = ap.parse_args()
    model = api.load_model(str(models.resolve(args.model)))
    steering = api.steering_from_specs(model, [args.vector])
    rejection = api.rejection_config(args.topk, loop=args.loop)
    sampling = api.sampling_config(temperature=args.temperature, seed=1)

    decode_seconds = [0.0]
    decode = runtime.Context.decode

    def timed_decode(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return decode(self, *a, **k)
        finally:
            decode_seconds[0] += time.perf_counter() - t0

    steerer = api.make_steerer(model, steering, rejection)
    prompt = api.chat_prompt(model, PROMPT)
    api.run_reply(steerer, prompt, 8, sampling)  # warm-up: contexts, calibration

    def reply():
        decode_seconds[0] = 0.0
        t0 = time.perf_counter()
        run = api.run_reply(steerer, prompt, args.tokens, sampling)
        return run, time.perf_counter() - t0, decode_seconds[0]

    runtime.Context.decode = timed_decode
    prof = cProfile.Profile()
    prof.enable()
    reply()
    prof.disable()
    runs = sorted((reply() for _ in range(3)), key=lambda r: r[1])  # without the profiler; the fastest
    runtime.Context.decode = decode
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    text = out.getvalue()
    print(text[text.index("   ncalls"):].rstrip())
    run, seconds, decoding = runs[0]
    print(f"\n{args.model}, {args.vector}, reject top-{args.topk}, loop "
          f"{'joint' if steerer._joint_run else 'drafted'}, {default_threads()} threads: {run.n_tokens} tokens "
          f"in {seconds:.3f} s ({run.tokens_per_second:.1f} tok/s, prompt included), llama_decode {decoding:.3f} s, "
          f"the rest {seconds - decoding:.3f} s = {(seconds - decoding) / decoding:.1%} of the decodes (goal <= 5%)")


if __name__ == "__main__":
    try:
        main()
    except LocalsteerError as e:
        sys.exit(f"error: {e}")
