"""Peak memory of plain decoding vs dynamic rejection: the joint loop (one context holding both
sequences) and the drafted loop (two contexts); the weights are loaded once either way.

    .venv/bin/python scripts/rss_rejection.py [--model qwen2.5-coder-0.5b-instruct]

Each mode runs in its own process; prints peak RSS (MB) and the ratio.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(model_name: str, mode: str) -> None:
    from localsteer import api
    model = api.load_model(model_name)
    steering = api.steering_from_specs(model, [f"{ROOT}/vectors/{model_name}/uppercase-mean.gguf"])
    rej = api.rejection_config(20, loop=mode) if mode in ("joint", "drafted") else None
    api.generate(model, "Write a story about a storm.", steering if mode != "plain" else api.Steering(None, ()),
                 sampling=api.sampling_config(temperature=0), max_tokens=64, rejection=rej)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.child)
        return
    rss = {}
    for mode in ("plain", "steered", "joint", "drafted"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", mode],
                             capture_output=True, text=True, check=True).stdout
        rss[mode] = float(out.strip().splitlines()[-1])
    print(f"model {args.model}: peak RSS " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items())
          + f"; rejection / plain: joint {rss['joint'] / rss['plain']:.2f}, drafted {rss['drafted'] / rss['plain']:.2f}")


if __name__ == "__main__":
    main()
