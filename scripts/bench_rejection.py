"""Dynamic rejection speed, in one run on the same machine, prompt and length, per model:

  llama-cpp  plain greedy decoding through llama-cpp-python's own `Llama` (outside reference)
  plain      localsteer, no vector
  steered    the vector, no rejection
  naive      rejection, token by token on two contexts (one steered + one plain evaluation per token)
  drafted    rejection with drafting: steered drafts checked by one batched plain decode
  joint      rejection in one context: each token one decode of two rows, steered and plain
             (the default on a CPU, `Rejection.loop` "auto")

    .venv/bin/python scripts/bench_rejection.py [--models smollm2-135m-instruct,...] [--tokens 96]

tok/s counts generated tokens over the generation time (prompt processing excluded); ratios are to
`llama-cpp`. Also prints the cost of a batched decode relative to a single-token one, which bounds
what drafting can gain on this machine, and the peak RSS (weights are loaded once per model).
Also says whether the joint loop chose the same tokens as the drafted one.
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

from localsteer import api, models  # noqa: E402
from localsteer.importance import importance_order  # noqa: E402
from localsteer.runtime import default_threads  # noqa: E402
from localsteer.steer import Rejection, Steerer  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and a storm."
MODELS = "smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,qwen2.5-coder-1.5b-instruct"


def timed(events) -> tuple[float, int]:
    times = [time.perf_counter() for _ in events]
    return (len(times) - 1) / (times[-1] - times[0]), len(times)


def llama_cpp_reference(path: Path, prompt_text: str, n: int) -> float:
    from llama_cpp import Llama
    llm = Llama(str(path), n_ctx=2048, n_threads=default_threads(), n_gpu_layers=-1, verbose=False)
    stream = llm.create_completion(prompt_text, max_tokens=n, temperature=0.0, top_k=1, stream=True)
    speed, _ = timed(stream)
    llm.close()
    return speed


def batch_cost(model, prompt: list[int]) -> str:
    """Seconds of a batched decode of k tokens over one single-token decode."""
    ctx = model.context(n_ctx=1024)
    ctx.decode_sequence(prompt, 0)
    p = len(prompt)

    def t(k: int) -> float:
        best = 1e9
        for _ in range(3):
            ctx.remove(0, p, -1)
            t0 = time.perf_counter()
            ctx.decode(list(range(100, 100 + k)), range(p, p + k), [0] * k, [True] * k)
            best = min(best, time.perf_counter() - t0)
        return best

    one = t(1)
    out = " ".join(f"{k}:{t(k) / one:.2f}" for k in (2, 5, 8))
    ctx.close()
    return out


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
          f"shipped uppercase vector at scale {args.scale:g} on its suggested layers")
    print(f"{'model':<30}{'llama-cpp':>10}{'plain':>14}{'steered':>14}{'naive':>14}{'drafted':>14}{'joint':>14}"
          f"{'accepted':>10}  batch cost (k: x single)")
    for name in args.models.split(","):
        path = models.resolve(name)
        model = api.load_model(str(path))
        steering = api.steering_from_specs(model, [f"{ROOT}/vectors/{name}/uppercase.gguf:{args.scale}"])
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
                evs = []
                times = []
                for ev in st.generate(prompt, args.tokens, api.sampling_config(temperature=0), fast=fast):
                    evs.append(ev)
                    times.append(time.perf_counter())
                speeds[key].append((len(times) - 1) / (times[-1] - times[0]))
                if key == "drafted":
                    accepted = sum(e.status == "steered" for e in evs) / len(evs)
                chosen[key] = [e.token for e in evs]
        med = {k: statistics.median(v) for k, v in speeds.items()}
        ref = med["llama-cpp"]
        cells = "".join(f"{med[k]:>7.1f} ({med[k] / ref:.2f})" for k in runs)
        print(f"{name:<30}{ref:>10.1f}{cells}{accepted:>10.0%}  {batch_cost(model, prompt)}")
        same = sum(a == b for a, b in zip(chosen["joint"], chosen["drafted"]))
        print(f"{'':<30}joint chose the drafted loop's token {same}/{len(chosen['drafted'])} times")
        for st, _ in runs.values():
            st.close()
        model.close()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          "(all models in turn, one process)")


if __name__ == "__main__":
    main()
