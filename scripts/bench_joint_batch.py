"""The bare decode costs behind dynamic rejection's two loops.

Rejection needs, per token, the steered and the plain next-token distributions. llama.cpp's
control vector applies to every row of a batch, so the "drafted" loop keeps two contexts: the
steered one decodes one token at a time, the plain one checks drafts in batches. The "joint"
loop (the default on a CPU) holds both sequences in one context and decodes two rows per token,
the vector added to the steered row only by the eval callback (`l_out-<il>` tensors are written
back before the next layer reads them; `runtime.RowSteer`). This script measures the raw
decodes of each, without the rejection logic, in ms per token on the same model, prompt and
thread count:

  plain       one row per decode, no vector (the reference)
  steered     one row per decode, llama.cpp's control vector
  two rows    two rows per decode, no callback (the bare batch cost)
  joint       two rows per decode, the vector added to row 0 by the callback
  checked     the token-by-token rejection loop's decodes: one steered, one plain batch of two
  drafted     localsteer's rejection (`Steerer`, top-20, drafts of 3 checked in one plain batch)

and whether the joint loop's steered row chooses the same greedy tokens as `steered`.

  python scripts/bench_joint_batch.py [--model NAME] [--vector PATH] [-n TOKENS] [-t THREADS]
"""

from __future__ import annotations

import argparse
import time

import localsteer  # noqa: F401  (loads llama.cpp before numpy; see localsteer/__init__.py)
import numpy as np

from localsteer.models import resolve as resolve_model
from localsteer.runtime import Model, RowSteer
from localsteer.sampling import Sampling
from localsteer.steer import Rejection, Steerer
from localsteer.vector import ControlVector

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vector", default=None, help="default: the model's shipped lowercase instruction vector")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    from pathlib import Path

    root = Path(__file__).parent.parent
    path = resolve_model(args.model)
    vec_path = args.vector or root / "vectors" / args.model / "lowercase.gguf"
    model = Model(path)
    vector = ControlVector.load(vec_path).fit(model.arch, model.n_layer, model.n_embd)
    layers = vector.layers
    prompt = model.user_prompt("Explain how a microwave oven heats food.")
    n = args.n
    results: dict[str, float] = {}

    def single(control: bool) -> list[int]:
        ctx = model.context(n_ctx=1024, n_threads=args.threads)
        if control:
            ctx.set_control(vector.directions, min(layers), max(layers))
        ctx.decode_sequence(prompt, 0)
        toks = []
        t0 = time.perf_counter()
        for i in range(n):
            tok = int(np.argmax(ctx.logits()))
            toks.append(tok)
            ctx.decode([tok], [len(prompt) + i], [0], [True])
        results["steered" if control else "plain"] = (time.perf_counter() - t0) / n
        ctx.close()
        return toks

    def two_rows() -> None:
        ctx = model.context(n_ctx=1024, n_seq_max=2, n_threads=args.threads)
        ctx.decode_sequence(prompt, 0)
        ctx.decode_sequence(prompt, 0, seq_id=1)
        t0 = time.perf_counter()
        for i in range(n):
            tok = int(np.argmax(ctx.logits(0))) if i else int(np.argmax(ctx.logits()))
            p = len(prompt) + i
            ctx.decode([tok, tok], [p, p], [0, 1], [True, True])
        results["two rows"] = (time.perf_counter() - t0) / n
        ctx.close()

    def joint() -> tuple[list[int], float]:
        steer = RowSteer()
        steer.set(vector.directions, layers)
        ctx = model.context(n_ctx=1024, n_seq_max=2, n_threads=args.threads, capture=steer)
        steer.rows = None  # every prompt row
        ctx.decode_sequence(prompt, 0)
        first = ctx.logits()
        steer.rows = []
        ctx.decode_sequence(prompt, 0, seq_id=1)
        toks = []
        steer.rows = [0]
        t0 = time.perf_counter()
        logits = first
        for i in range(n):
            tok = int(np.argmax(logits))
            toks.append(tok)
            p = len(prompt) + i
            ctx.decode([tok, tok], [p, p], [0, 1], [True, True])
            logits = ctx.logits(0)
        results["joint"] = (time.perf_counter() - t0) / n
        ctx.close()
        return toks, first

    def checked() -> None:
        s = model.context(n_ctx=1024, n_threads=args.threads)
        s.set_control(vector.directions, min(layers), max(layers))
        pl = model.context(n_ctx=1024, n_threads=args.threads)
        s.decode_sequence(prompt, 0)
        pl.decode_sequence(prompt, 0)
        hist = list(prompt)
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(s.logits()))
            hist.append(tok)
            p = len(hist) - 1
            s.decode([tok], [p], [0], [True])
            pl.remove(0, p - 1, -1)
            pl.decode([hist[p - 1], tok], [p - 1, p], [0, 0], [False, True])
            pl.logits()
        results["checked"] = (time.perf_counter() - t0) / n
        s.close()
        pl.close()

    def drafted() -> list[int]:
        """localsteer's own rejection loop (two contexts, drafts of 3 verified in one batch)."""
        rejection = Rejection(topk=20, fold=str(vector.meta.get("reject_fold", "none")), loop="drafted")
        st = Steerer(model, vector, layers, rejection, details=False, n_ctx=1024, n_threads=args.threads)
        greedy = Sampling(temperature=0)
        list(st.generate(prompt, max_tokens=1, sampling=greedy))  # makes the contexts
        t0 = time.perf_counter()
        list(st.generate(prompt, max_tokens=1, sampling=greedy))
        t1 = time.perf_counter()
        events = list(st.generate(prompt, max_tokens=n, sampling=greedy))
        # the prompt's decoding (on both contexts) is left out, as in the loops above
        results["drafted"] = (time.perf_counter() - t1 - (t1 - t0)) / (len(events) - 1)
        st.close()
        return [e.token for e in events]

    plain_toks = single(False)
    steered_toks = single(True)
    two_rows()
    joint_toks, _ = joint()
    checked()
    drafted_toks = drafted()
    same = sum(a == b for a, b in zip(steered_toks, joint_toks))
    first_diff = next((i for i, (a, b) in enumerate(zip(steered_toks, joint_toks)) if a != b), None)
    print(f"{args.model}, {len(layers)} steered layers, {n} tokens, threads {args.threads or 'default'}")
    base = results["plain"]
    for k in ("plain", "steered", "two rows", "joint", "checked", "drafted"):
        print(f"  {k:<9} {1000 * results[k]:7.2f} ms/token   {base / results[k]:5.2f} x plain speed")
    print(f"  joint's steered row chose the steered greedy token {same}/{n} times"
          + (f" (first difference at token {first_diff})" if first_diff is not None else " (identical)"))
    print(f"  steered text: {model.detokenize(steered_toks)[:120]!r}")
    print(f"  joint text:   {model.detokenize(joint_toks)[:120]!r}")
    print(f"  plain text:   {model.detokenize(plain_toks)[:120]!r}")
    print(f"  drafted text: {model.detokenize(drafted_toks)[:120]!r} (rejection, top-20)")


if __name__ == "__main__":
    main()
