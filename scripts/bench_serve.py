"""`localsteer serve` against `generate`, in one run on the same machine and loaded model:

  generate   api.generate, greedy, each prompt steered by its vector (the reference)
  1 client   the same requests through the server (openai client, loopback, not streamed)
  2, 4 clients  as many concurrent clients, each with a different vector

    .venv/bin/python scripts/bench_serve.py [--model qwen2.5-coder-0.5b-instruct] [--tokens 96] [--requests 4]
                                            [--rounds 3]

tok/s is completion tokens / wall time (prompt processing included on both sides). Printed: one
client / generate (the goal is >= 0.95) and the aggregate tok/s of 2 and 4 clients / one client
(on 2 CPU cores little can be gained), with the slots taking turns (`--batch off`), with
their rows in one decode (`--batch on`), and as `--batch auto` (the default) decides by the
machine's measured decode costs, round by round (server.Engine).
"""

from __future__ import annotations

import argparse
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, server  # noqa: E402

PROMPTS = ["Describe how a lighthouse works.", "Explain why the sky is blue.", "Give advice to a new gardener.",
           "What makes a good neighbor?"]
VECTORS = ["happy-sad:4", "happy-sad:-4", "uppercase", "lowercase"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of generate and one client")
    args = ap.parse_args()
    import openai
    import uvicorn

    model = api.load_model(args.model)
    greedy = api.sampling_config(temperature=0)
    n_ctx = 1024

    def reference(i: int) -> int:
        steering = api.steering_from_specs(model, [VECTORS[i % len(VECTORS)]])
        r = api.generate(model, PROMPTS[i % len(PROMPTS)], steering, greedy, max_tokens=args.tokens, n_ctx=n_ctx)
        return len(r.tokens)

    def generated() -> float:
        t0 = time.perf_counter()
        n = sum(reference(i) for i in range(args.requests))
        return n / (time.perf_counter() - t0)

    reference(0)  # warm
    index = server.vector_index(model, args.model)
    state = {}

    def start(batch: bool | str) -> server.Engine:
        engine = server.Engine(model, slots=4, queue=16, n_ctx=n_ctx, batch=batch)
        app = server.make_app(server.Service(model, args.model, engine, index))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.02)
        state["srv"] = srv
        state["client"] = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                        timeout=600)
        return engine

    def stop(engine: server.Engine) -> None:
        state["srv"].should_exit = True
        engine.close()

    engine = start(batch=False)

    def request(i: int) -> int:
        r = state["client"].chat.completions.create(model=args.model, messages=[{"role": "user", "content": PROMPTS[i % 4]}],
                                           max_tokens=args.tokens, temperature=0,
                                           extra_body={"steering": {"vectors": [VECTORS[i % len(VECTORS)]]}})
        return r.usage.completion_tokens

    def clients(k: int) -> float:
        def one(c: int) -> int:
            return sum(request(c + k * j) for j in range(args.requests))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(k) as pool:
            n = sum(pool.map(one, range(k)))
        return n / (time.perf_counter() - t0)

    request(0)  # warm
    # generate and one client alternate, --rounds times (this host's speed drifts between runs):
    # the ratio of the sums
    pairs = [(generated(), clients(1)) for _ in range(args.rounds)]
    plain = args.rounds / sum(1 / a for a, _ in pairs)
    one = args.rounds / sum(1 / b for _, b in pairs)
    many = {k: clients(k) for k in (2, 4)}
    stop(engine)
    engine = start(batch=True)  # the same clients with the requests' rows batched into one decode
    request(0)
    batched = {k: clients(k) for k in (1, 2, 4)}
    widest = engine.widest
    stop(engine)
    engine = start(batch="auto")  # the default: together where the measured costs say it pays
    request(0)
    auto = {k: clients(k) for k in (1, 2, 4)}
    mode = engine.mode
    stop(engine)
    print(f"model {args.model}, {args.requests} requests x {args.tokens} tokens per client, greedy, steered, "
          f"{args.rounds} rounds, {cpu_name()}")
    print("  per round (generate, 1 client): " + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in pairs))
    print(f"  generate     {plain:6.1f} tok/s")
    print(f"  1 client     {one:6.1f} tok/s   {one / plain:.2f} x generate (goal >= 0.95)")
    for k, v in many.items():
        print(f"  {k} clients    {v:6.1f} tok/s   {v / one:.2f} x one client (aggregate; slots take turns)")
    for k, v in batched.items():
        print(f"  {k} client{'s' if k > 1 else ' '}    {v:6.1f} tok/s   {v / one:.2f} x one client (--batch on: "
              f"the rows in one decode; widest {widest})")
    for k, v in auto.items():
        print(f"  {k} client{'s' if k > 1 else ' '}    {v:6.1f} tok/s   {v / one:.2f} x one client (--batch auto, "
              f"the default: {mode}){f'; 1 client {v / plain:.2f} x generate' if k == 1 else ''}")


if __name__ == "__main__":
    main()
