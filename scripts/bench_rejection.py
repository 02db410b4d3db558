"""Dynamic rejection speed, in one run on the same machine, prompt and length, per model:

  llama-cpp  plain greedy decoding through llama-cpp-python's own `Llama` (outside reference)
  plain      localsteer, no vector
  steered    the vector, no rejection
  naive      rejection, token by token on two contexts (one steered + one plain evaluation per token)
  drafted    rejection with drafting: steered drafts checked by one batched plain decode
  joint      rejection in one context: each token one decode of two rows, steered and plain
  auto       (`Rejection.loop` "auto") the loop the machine's measured decode costs favour
             (localsteer/calibrate.py) at the share of tokens accepted, printed with how it
             compares to the faster of the two, and with the machine's floor: 1 / the cost of a
             decode of two rows over one (what evaluating a steered and a plain row per token
             in one decode reaches at no other cost), to localsteer's plain decoding

    .venv/bin/python scripts/bench_rejection.py [--models smollm2-135m-instruct,...] [--tokens 96]

tok/s is (n - 1) / (T(n) - T(1)), where T(k) is the wall time from the call to the k-th token:
prompt processing and the first token (read off the prompt's logits) cancel out, for every loop
alike. (Timing from the first token instead would flatter drafting, whose first token arrives
only once its whole first draft is checked.) Ratios are to `llama-cpp`.

Also prints, per model: what a decode of k tokens costs relative to one token (a second row per
token is what every rejection loop pays; it bounds them all on this machine); how far a k-token
batch's logits are from k one-token decodes' (why drafts stop at 3); the loops' speed over
localsteer's plain decoding of the same loaded model; whether the joint loop chose the drafted
loop's tokens; and the peak RSS (weights are loaded once per model). The same-load ratios are
the steadier ones: a model's speed also depends on the load (scripts/load_variance.py: three
loads of the 1.5B model in one process ran at 69, 63 and 61 ms per token), which moves the ratios
to `llama-cpp`, loaded on its own, by up to about 10% from run to run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, calibrate, models  # noqa: E402
from localsteer.errors import LocalsteerError  # noqa: E402
from localsteer.importance import importance_order  # noqa: E402
from localsteer.runtime import default_threads  # noqa: E402
from localsteer.steer import Rejection, Steerer  # noqa: E402
import numpy as np  # noqa: E402  (after localsteer, which loads llama.cpp first)

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"


def wall(events) -> tuple[float, list]:
    """Seconds from the call to the last item of `events`, and the items."""
    t0 = time.perf_counter()
    items = list(events)
    return time.perf_counter() - t0, items


def speed(timed_run, n: int) -> tuple[float, list]:
    """Tokens/s over tokens 2..n, and the n tokens; `timed_run(k)` gives `wall` of k tokens."""
    timed_run(1)  # warm-up: one-time setup must not count in T(1)
    t1, _ = timed_run(1)
    tn, items = timed_run(n)
    return (len(items) - 1) / (tn - t1), items


def llama_cpp_reference(path: Path, prompt_text: str, n: int) -> float:
    from llama_cpp import Llama

    def timed_run(k: int):  # a fresh Llama each time: it would reuse the prompt it has already read
        llm = Llama(str(path), n_ctx=2048, n_threads=default_threads(), n_gpu_layers=-1, verbose=False)
        out = wall(llm.create_completion(prompt_text, max_tokens=k, temperature=0.0, top_k=1, stream=True))
        llm.close()
        return out
    return speed(timed_run, n)[0]


def batch_cost(model, prompt: list[int]) -> tuple[str, str]:
    """The cost of a batched decode of k tokens over one single-token decode, and how far its
    logits are from those of k single-token decodes of the same tokens (max |difference|)."""
    ctx = model.context(n_ctx=1024)
    ctx.decode_sequence(prompt, 0)
    p = len(prompt)
    toks = list(range(100, 116))

    def run(k: int) -> np.ndarray:
        ctx.remove(0, p, -1)
        ctx.decode(toks[:k], range(p, p + k), [0] * k, [True] * k)
        return ctx.logits_rows(k)

    def t(k: int) -> float:
        best = 1e9
        for _ in range(5):
            t0 = time.perf_counter()
            run(k)
            best = min(best, time.perf_counter() - t0)
        return best

    one = t(1)
    cost = " ".join(f"{k}:{t(k) / one:.2f}" for k in (2, 3, 4, 8, 16))
    ctx.remove(0, p, -1)
    single = []
    for i, tok in enumerate(toks[:4]):
        ctx.decode([tok], [p + i], [0], [True])
        single.append(ctx.logits())
    drift = " ".join(f"{k}:{np.abs(run(k) - np.array(single[:k])).max():.1g}" for k in (2, 3, 4))
    ctx.close()
    return cost, drift


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--topk", type=int, default=Rejection().topk)
    ap.add_argument("--draft", type=int, default=Rejection().draft)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="vector scale (1: the suggested strength)")
    args = ap.parse_args()
    print(f"{default_threads()} threads; {args.tokens} tokens greedy; reject top-k {args.topk}, draft {args.draft}; "
          f"shipped uppercase-mean vector at scale {args.scale:g} on its suggested layers")
    print(f"{'model':<30}{'llama-cpp':>10}{'plain':>14}{'steered':>14}{'naive':>14}{'drafted':>14}{'joint':>14}"
          f"{'accepted':>10}")
    for name in args.models.split(","):
        path = models.resolve(name)
        model = api.load_model(str(path))
        steering = api.steering_from_specs(model, [f"{ROOT}/vectors/{name}/uppercase-mean.gguf:{args.scale}"])
        vec, layers = steering.vector, list(steering.layers)
        order = importance_order(model, vec, layers, models.quick_fingerprint(path))
        prompt_text = model.apply_chat_template([{"role": "user", "content": PROMPT}])
        prompt = model.tokenize(prompt_text)
        rej = Rejection(topk=args.topk, draft=args.draft, loop="drafted")
        joint = Rejection(topk=args.topk, loop="joint")
        runs = {
            "plain": (Steerer(model, details=False), True),
            "steered": (Steerer(model, vec, layers, details=False), True),
            "naive": (Steerer(model, vec, layers, rej, order, details=False), False),
            "drafted": (Steerer(model, vec, layers, rej, order, details=False), True),
            "joint": (Steerer(model, vec, layers, joint, order, details=False), True),
        }
        speeds: dict[str, list[float]] = {k: [] for k in ["llama-cpp", *runs]}
        accepted = 0.0
        chosen: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            speeds["llama-cpp"].append(llama_cpp_reference(path, prompt_text, args.tokens))
            for key, (st, fast) in runs.items():
                tok_s, evs = speed(lambda k, st=st, fast=fast: wall(st.generate(prompt, k, api.sampling_config(temperature=0),
                                                                            fast=fast)), args.tokens)
                speeds[key].append(tok_s)
                if key == "drafted":
                    accepted = sum(e.status == "steered" for e in evs) / len(evs)
                chosen[key] = [e.token for e in evs]
        med = {k: statistics.median(v) for k, v in speeds.items()}
        ref = med["llama-cpp"]
        cells = "".join(f"{med[k]:>7.1f} ({med[k] / ref:.2f})" for k in runs)
        print(f"{name:<30}{ref:>10.1f}{cells}{accepted:>10.0%}")
        cost, drift = batch_cost(model, prompt)
        print(f"{'':<30}a decode of k tokens costs (k: x one token) {cost}")
        print(f"{'':<30}its logits differ from k one-token decodes' by at most {drift}")
        print(f"{'':<30}same model load: joint / plain {med['joint'] / med['plain']:.2f}, "
              f"drafted / plain {med['drafted'] / med['plain']:.2f}")
        c = calibrate.costs(model, fresh=True)
        pick = "joint" if c.joint_wins(accepted) else "drafted"
        best = max(("joint", "drafted"), key=lambda k: med[k])
        print(f"{'':<30}auto (measured: {c.describe()}): {pick} at {med[pick]:.1f} tok/s, "
              f"{med[pick] / med[best]:.2f} x the faster loop ({best}; goal >= 0.97)")
        floor = c.one / c.rows[2]
        print(f"{'':<30}floor 1 / (a 2-row decode over one, {c.rows[2] / c.one:.2f}) = {floor:.2f} x plain; auto "
              f"{med[pick] / med['plain']:.2f} x plain = {med[pick] / med['plain'] / floor:.2f} x the floor (goal >= 0.90)")
        same = sum(a == b for a, b in zip(chosen["joint"], chosen["drafted"]))
        print(f"{'':<30}joint chose the drafted loop's token {same}/{len(chosen['drafted'])} times")
        for st, _ in runs.values():
            st.close()
        model.close()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          "(all models in turn, one process)")


if __name__ == "__main__":
    try:
        main()
    except LocalsteerError as e:
        sys.exit(f"error: {e}")
