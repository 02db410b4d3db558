"""Write the tiny synthetic models of tests/tiny_models.py (one per architecture: random weights,
a real tokenizer) into the model cache, or to a directory, and print where they are.

    .venv/bin/python scripts/tiny_models.py                 # all of them, into $LOCALSTEER_HOME/models/tiny/
    .venv/bin/python scripts/tiny_models.py phi3 gemma3     # some
    .venv/bin/python scripts/tiny_models.py --out DIR       # elsewhere (never into the repository)
    .venv/bin/python scripts/tiny_models.py like-qwen2.5-0.5b   # a stand-in: random weights in a
                                                              # shipped model's shape, for timing

The stand-ins (like-smollm2-135m, like-qwen2.5-0.5b) are made only when named; scripts/bench_shapes.py
times decode shapes on them where the real model cannot be taken (a GPU machine with no model hub).

They take their tokenizers from smollm2-135m-instruct and qwen2.5-coder-0.5b-instruct, which must
be pulled (`localsteer models pull NAME`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # runs from a checkout without an install too

import tiny_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"which ({', '.join(tiny_models.TINY)}; default: all; stand-ins: {', '.join(tiny_models.SHAPES)})")
    parser.add_argument("--out", type=Path, default=None, help="write NAME.gguf here instead of the model cache")
    args = parser.parse_args()
    known = {**tiny_models.TINY, **tiny_models.SHAPES}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}: choose from {', '.join(known)}")
    for name in args.names or tiny_models.TINY:
        spec = known[name]
        path = tiny_models.make(name, args.out / f"{name}.gguf") if args.out else tiny_models.ensure(name)
        print(f"{name:17} {spec.arch:9} {spec.n_layer} x {spec.n_embd:<4} {path.stat().st_size / 1e6:5.1f} MB  {path}")


if __name__ == "__main__":
    main()
