"""Extraction speed: localsteer (batched capture through llama-cpp-python) vs llama.cpp's own
`llama-cvector-generator`, on the same model, the same 100 prompt pairs and the same machine.

    .venv/bin/python scripts/bench_extract.py [--model qwen2.5-coder-0.5b-instruct] [--pairs 100]

Needs the tools from scripts/build_llama_cpp.sh. Prints pairs/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localsteer import api, models  # noqa: E402
from localsteer.extract import format_pair  # noqa: E402
from localsteer.runtime import LLAMA_CPP_PYTHON_VERSION, default_threads  # noqa: E402


def pairs_for(n: int):
    pairs = []
    for name in ("lowercase.jsonl", "uppercase.jsonl", "happy-sad.jsonl"):
        pairs += api.load_pairs(ROOT / "vectors" / "datasets" / name)
    return pairs[:n]


def run_cvector_generator(model_path: Path, pos: list[str], neg: list[str], method: str, tmp: Path) -> float:
    exe = models.home() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}" / "bin" / "llama-cvector-generator"
    if not exe.is_file():
        sys.exit(f"{exe} missing: run scripts/build_llama_cpp.sh first")
    (tmp / "pos.txt").write_text("\n".join(p.replace("\n", "\\n") for p in pos) + "\n")
    (tmp / "neg.txt").write_text("\n".join(p.replace("\n", "\\n") for p in neg) + "\n")
    t0 = time.perf_counter()
    subprocess.run([str(exe), "-m", str(model_path), "--positive-file", str(tmp / "pos.txt"),
                    "--negative-file", str(tmp / "neg.txt"), "--method", method, "-o", str(tmp / "cv.gguf"),
                    "-t", str(default_threads())], check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--pairs", type=int, default=100)
    args = ap.parse_args()
    path = models.resolve(args.model)
    pairs = pairs_for(args.pairs)
    model = api.load_model(str(path))
    pos, neg = zip(*(format_pair(model, p) for p in pairs))
    n_tok = sum(len(model.tokenize(t)) for t in pos + neg)
    print(f"model {args.model}, {len(pairs)} pairs ({n_tok} prompt tokens), {default_threads()} threads, "
          f"{os.cpu_count()} cores")
    print(f"{'method':<7}{'localsteer pairs/s':>20}{'cvector-generator pairs/s':>28}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("mean", "pca"):
            t0 = time.perf_counter()
            api.extract_vector(model, pairs, method=method)
            ours = time.perf_counter() - t0
            theirs = run_cvector_generator(path, list(pos), list(neg), method, Path(tmp))
            print(f"{method:<7}{len(pairs) / ours:>20.2f}{len(pairs) / theirs:>28.2f}{theirs / ours:>8.2f}")
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: localsteer {rss_self:.0f} MB, cvector-generator {rss_child:.0f} MB")


if __name__ == "__main__":
    main()
