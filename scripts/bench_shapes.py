"""What each decode shape localsteer uses costs on this machine, relative to a decode of one row, in
one run on one loaded model: the numbers that decide between its loops (calibrate.py, steer.py,
directer.py, server.py) and bound their speed.

  rows k       one decode of k plain rows (k sequences sharing a prompt): a rejection loop's
               steered + plain row (k = 2), the drafted loop's checks (2, 3), batched requests
  joint        2 rows, the first steered by the eval callback (`RowSteer`): the joint loop's token
  per-row k    k rows, each steered on its own layer set by the callback (`RowsSteer`): the
               server's batched requests, or the weakened layer sets of one rejected token
               evaluated together
  keys k       k rows with no flash attention, the first with the instruction's keys scaled in
               every layer by the callback (`KeyScale`): DIRECTER's token (k = 2) and one of its
               trials (k = 1); against "no-fa 1", one plain row without flash attention

    .venv/bin/python scripts/bench_shapes.py [--model qwen2.5-coder-0.5b-instruct] [--prompt 256]

Each shape: the fastest of 24 decodes after 2 warm-ups, each one position further. A model that
cannot be taken to the machine can be stood in for by random weights of its shape
(`scripts/tiny_models.py like-qwen2.5-0.5b`, then `--model` its path): decode costs depend on the
shape, not on the weights.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, calibrate  # noqa: E402  (llama.cpp before numpy: localsteer/__init__.py)
from localsteer.errors import LocalsteerError  # noqa: E402
from localsteer.runtime import KeyScale, RowSteer, RowsSteer, backend_devices  # noqa: E402

import numpy as np  # noqa: E402

N, WARM = 24, 2


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [desc for name, desc in backend_devices() if not name.upper().startswith("CPU")]
    return cpu + (f"; {', '.join(gpus)}" if gpus else "")


def fastest(ctx, prompt: list[int], k: int, before=None) -> tuple[float, float]:
    """The fastest and the median time of a decode of `k` rows (sequence i: row i) after `prompt`."""
    ctx.clear()
    ctx.decode_sequence(prompt, 0, seq_id=0)
    for s in range(1, k):
        ctx.share(0, s)
    times = []
    for i in range(N + WARM):
        if before is not None:
            before()
        t0 = time.perf_counter()
        ctx.decode([1] * k, [len(prompt) + i] * k, list(range(k)), [True] * k)
        times.append(time.perf_counter() - t0)
    return min(times[WARM:]), statistics.median(times[WARM:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a known model's name or a GGUF path")
    ap.add_argument("--prompt", type=int, default=256, help="tokens in the cache before the timed decodes")
    ap.add_argument("--rows", default="2,3,4,8", help="row counts to time")
    args = ap.parse_args()
    widths = sorted({int(x) for x in args.rows.split(",")})
    model = api.load_model(args.model)
    prompt = (model.tokenize("The quick brown fox jumps over the lazy dog. " * 64))[:args.prompt]
    n_seq = max(widths + [2])
    n_ctx = (len(prompt) + N + WARM + 8) * n_seq
    rng = np.random.default_rng(0)
    directions = (0.01 * rng.standard_normal((model.n_layer, model.n_embd))).astype(np.float32)
    layers = range(model.n_layer // 4, 3 * model.n_layer // 4)
    results: list[tuple[str, float, float]] = []

    with model.context(n_ctx=n_ctx, n_seq_max=n_seq) as ctx:
        for k in [1] + widths:
            results.append((f"rows {k}", *fastest(ctx, prompt, k)))
    row = RowSteer()
    with model.context(n_ctx=n_ctx, n_seq_max=n_seq, capture=row) as ctx:
        row.set(directions, layers)

        def steer_first() -> None:
            row.rows = [0]
        results.append(("joint", *fastest(ctx, prompt, 2, steer_first)))
    rows = RowsSteer()
    with model.context(n_ctx=n_ctx, n_seq_max=n_seq, capture=rows) as ctx:
        for k in widths:
            # as halving weakens: all the layers, then half of them, a quarter, ...
            sets = [list(layers)[:max(1, len(layers) >> i)] for i in range(k)]
            rows.set_rows([(directions, s) for s in sets])
            results.append((f"per-row {k}", *fastest(ctx, prompt, k)))
    keys = KeyScale()
    with model.context(n_ctx=n_ctx, n_seq_max=2, flash_attn=False, capture=keys) as ctx:
        results.append(("no-fa 1", *fastest(ctx, prompt, 1)))
        keys.set(range(model.n_layer), range(len(prompt) - 32, len(prompt)), 100.0, [0])
        results.append(("keys 1", *fastest(ctx, prompt, 1)))
        results.append(("keys 2", *fastest(ctx, prompt, 2)))

    one = results[0][1]
    print(f"model {Path(str(model.path)).name}, {model.n_layer} layers x {model.n_embd}, {len(prompt)} tokens cached, "
          f"{'offloaded' if model.offloaded else 'CPU'}; {machine()}")
    print(f"{'shape':12} {'ms (fastest)':>12} {'median':>8} {'x rows 1':>9}")
    for name, best, median in results:
        print(f"{name:12} {1000 * best:12.2f} {1000 * median:8.2f} {best / one:9.2f}")
    costs = calibrate.measure(model, widths=widths)
    print(f"calibration: {costs.describe()}")
    print("serve batches pay (calibration): "
          + ", ".join(f"{k} rows {'yes' if costs.rows[k] < k * costs.one else 'no'}" for k in sorted(costs.rows)))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
    except (LocalsteerError, OSError, ValueError) as e:
        print(f"bench_shapes: error: {e}", file=sys.stderr)
        sys.exit(1)
