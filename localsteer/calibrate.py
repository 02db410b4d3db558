"""What decode shapes cost on the machine at hand, measured once per model, backend and thread
count and cached in `$LOCALSTEER_HOME/calibration/`: the choice of rejection loop (`auto`) is
made by these numbers, not by the kind of device.

Rejection evaluates a steered and a plain row per token, in one of two loops (steer.py):
- joint: one context, one decode of two rows per token, the vector added to the steered row by an
  eval callback (`runtime.RowSteer`);
- drafted: the steered row alone (llama.cpp's own control vector), and the plain model checking
  `draft` steered tokens at once in one decode of `draft` rows.

Per token, joint costs `joint` (a two-row decode with the callback), drafted about `one` plus
`rows[draft]` / draft. On the Intel hosts a second row costs 0.22 of a first and joint wins; on
the AMD EPYC ones two rows cost 1.6-2.5 x one and drafted wins; on GPUs rows are nearly free.

DIRECTER (directer.py) evaluates a plain and a key-scaled row per token, without flash attention:
"split" decodes the plain row first and the steered one only where the skip test fails
(`keys_plain` + `keys_one`), "joint" both in one decode (`keys_two`): `directer_joint_wins`.
The measurement takes about two seconds on a 0.5B model.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .fileio import write_text
from .models import home, quick_fingerprint
from .runtime import KeyScale, Model, RowSteer, backend_devices, default_threads

VERSION = 3  # 2: the DIRECTER shapes; 3: eval callbacks armed once a decode (cheaper steered shapes)
NOISY = 2.0  # the median of a shape's decodes over its fastest, beyond which the numbers are not kept
N_DECODES = 12  # per shape, after one warm-up; the fastest counts (other work on the cores only slows a decode)


@dataclass(frozen=True)
class Costs:
    """Seconds per decode: `one` row; `rows[k]`, k plain rows; `joint`, two rows with the
    steered one's vector added by the eval callback. `draft`: the drafted loop's batch. Without
    flash attention, as DIRECTER runs: `keys_plain`, one plain row; `keys_one`, one row with the
    instruction's keys scaled in every layer (`runtime.KeyScale`); `keys_two`, a plain and a
    key-scaled row in one decode (0: not measured)."""

    one: float
    rows: dict[int, float]
    joint: float
    draft: int = 3
    noisy: bool = False  # the decodes' times spread widely: other work on the cores (not cached)
    keys_plain: float = 0.0
    keys_one: float = 0.0
    keys_two: float = 0.0

    @property
    def joint_per_token(self) -> float:
        return self.joint

    def drafted_per_token(self, acceptance: float = 1.0) -> float:
        """The drafted loop's expected seconds per token when each steered token passes the
        plain check with probability `acceptance` (rejection rounds aside: both loops pay them
        alike). With the plain side lagging one token (steer.py, `drafted`), a check of m rows
        judges m drafts, m - 2 of them drafted before the check; it ends at the first rejection
        (at draft j: j tokens, max(m - 2, j - 1) + 1 steered decodes) or after m passes (m
        tokens, m steered decodes). The cheaper of 2 rows and `draft` rows."""
        a = min(1.0, max(0.0, acceptance))

        def per_token(m: int) -> float:
            ends = [(a ** (j - 1) * (1 - a), j, max(m - 2, j - 1) + 1) for j in range(1, m + 1)] + [(a ** m, m, m)]
            seconds = sum(p * (steered * self.one + self.rows[m]) for p, _, steered in ends)
            return seconds / sum(p * tokens for p, tokens, _ in ends)

        return min(per_token(m) for m in sorted({2, self.draft}))

    def batch_wins(self, n: int) -> bool:
        """Whether one decode of `n` rows costs less than `n` decodes of one (the server's
        batched requests, `server.Engine`)."""
        return n > 1 and self.rows[n] < n * self.one

    def joint_wins(self, acceptance: float = 1.0) -> bool:
        """Whether the joint loop is the faster one at this share of steered tokens passing."""
        return self.joint_per_token < self.drafted_per_token(acceptance)

    def directer_joint_wins(self, skipped: float = 0.0) -> bool:
        """Whether DIRECTER's token is cheaper as one decode of its plain and steered rows than
        as the plain row alone followed, where the skip test fails (a share `1 - skipped` of the
        tokens), by the steered row."""
        s = min(1.0, max(0.0, skipped))
        return self.keys_two < self.keys_plain + (1 - s) * self.keys_one

    def directer_joint_below(self) -> float:
        """The share of skipped tokens below which `directer_joint_wins` (0: never, 1: always)."""
        if self.keys_one <= 0:
            return 0.0
        return min(1.0, max(0.0, 1 - (self.keys_two - self.keys_plain) / self.keys_one))

    def describe(self) -> str:
        low = next((a / 20 for a in range(20, -1, -1) if self.joint_wins(a / 20)), None)
        return (f"a decode of 2 rows costs {self.rows[2] / self.one:.2f} x one; per token: joint "
                f"{1000 * self.joint_per_token:.1f} ms, drafted {1000 * self.drafted_per_token():.1f} ms -> "
                f"{'joint' if self.joint_wins() else 'drafted'}"
                + ("" if self.joint_wins() or low is None else f" (joint when at most {low:.0%} of tokens pass)")
                + (f"; DIRECTER: both rows in one decode cost {self.keys_two / self.keys_plain:.2f} x a plain row, "
                   f"a key-scaled row alone {self.keys_one / self.keys_plain:.2f} x -> joint while under "
                   f"{self.directer_joint_below():.0%} of the tokens are skipped, else split" if self.keys_plain > 0 else "")
                + (" (noisy: other work on the cores; measured again next time)" if self.noisy else ""))


def _fastest_decode(ctx, prompt: list[int], n_rows: int, spread: list[float]) -> float:
    """The shortest time of a decode of `n_rows` rows (one per sequence), after the prompt."""
    ctx.clear()
    ctx.decode_sequence(prompt, 0, seq_id=0)
    for s in range(1, n_rows):
        ctx.share(0, s)
    times = []
    for i in range(N_DECODES + 1):
        t0 = time.perf_counter()
        ctx.decode([1] * n_rows, [len(prompt) + i] * n_rows, list(range(n_rows)), [True] * n_rows)
        times.append(time.perf_counter() - t0)
    spread.append(statistics.median(times[1:]) / min(times[1:]))
    return min(times[1:])


def measure(model: Model, n_threads: int | None = None, draft: int = 3, widths: Iterable[int] = ()) -> Costs:
    """Time decodes of 1, 2 and `draft` rows (and of each of `widths` rows: the server's batches),
    and the joint loop's two rows, after a short prompt."""
    prompt = model.tokenize("The quick brown fox jumps over the lazy dog. " * 4)
    shapes = sorted({1, 2, draft, *widths})
    n_seq = max(shapes)
    rows = RowSteer()
    directions = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
    with model.context(n_ctx=(len(prompt) + N_DECODES + 8) * n_seq, n_seq_max=n_seq, n_threads=n_threads,
                       capture=rows) as ctx:
        spread: list[float] = []
        costs = {k: _fastest_decode(ctx, prompt, k, spread) for k in shapes}
        rows.rows = [0]
        rows.set(directions, range(model.n_layer // 4, 3 * model.n_layer // 4))
        joint = _fastest_decode(ctx, prompt, 2, spread)
    keys = KeyScale()
    with model.context(n_ctx=(len(prompt) + N_DECODES + 8) * 2, n_seq_max=2, n_threads=n_threads, capture=keys,
                       flash_attn=False) as ctx:
        keys_plain = _fastest_decode(ctx, prompt, 1, spread)
        keys.set(range(model.n_layer), range(1, 9), 100.0, [0])
        keys_one = _fastest_decode(ctx, prompt, 1, spread)
        keys_two = _fastest_decode(ctx, prompt, 2, spread)
    return Costs(costs[1], {k: v for k, v in costs.items() if k > 1}, joint, draft, noisy=max(spread) > NOISY,
                 keys_plain=keys_plain, keys_one=keys_one, keys_two=keys_two)


def _path(model: Model, n_threads: int) -> Path:
    devices = "-".join(sorted({name for name, _ in backend_devices()})) or "cpu"
    where = "gpu" if model.offloaded else "cpu"
    key = f"{quick_fingerprint(model.path)[:16]}-{where}-{devices}-{n_threads}t-v{VERSION}".replace("/", "_")
    return home() / "calibration" / f"{key}.json"


_memo: dict[Path, Costs] = {}


def costs(model: Model, n_threads: int | None = None, fresh: bool = False, widths: Iterable[int] = ()) -> Costs:
    """The model's decode costs on this machine: from the cache, else measured and cached.
    `widths`: decodes of these numbers of rows must be among them (measured if not)."""
    threads = n_threads or default_threads()
    path = _path(model, threads)
    widths = set(widths)
    if not fresh:
        if path in _memo and widths <= {1, *_memo[path].rows}:
            return _memo[path]
        try:
            data = json.loads(path.read_text())
            c = Costs(data["one"], {int(k): v for k, v in data["rows"].items()}, data["joint"], data["draft"],
                      keys_plain=data["keys_plain"], keys_one=data["keys_one"], keys_two=data["keys_two"])
            if not (c.one > 0 and c.joint > 0 and c.draft in c.rows and 2 in c.rows
                    and min(c.keys_plain, c.keys_one, c.keys_two) > 0):
                raise ValueError(path)
            if not widths <= {1, *c.rows}:
                raise KeyError(widths)  # measured again, with the widths asked for
            _memo[path] = c
            return c
        except (OSError, ValueError, KeyError, TypeError):
            pass
    cached = _memo.get(path)
    c = measure(model, threads, widths=widths | set(cached.rows if cached else ()))
    if not c.noisy:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps(asdict(c)))
        except OSError:
            pass  # a read-only home: measured again next time
    _memo[path] = c
    return c
