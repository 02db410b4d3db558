"""How often llama.cpp's DIRECTER and the PyTorch reference (tests/test_directer_faithful.py)
choose the same token, beside the same share for plain greedy decoding, on a model of your choice:
8 instruction prompts x 48 tokens, greedy. On a float32 model both are 100% (the test); on a
quantized one the steered pass amplifies llama.cpp's quantized arithmetic by alpha.

    .venv/bin/python scripts/directer_agreement.py [MODEL]   # default qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from localsteer import api, models  # noqa: E402
from localsteer.kts import load_hf  # noqa: E402
from test_directer_faithful import agreement  # noqa: E402


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b-instruct"
    model = api.load_model(name)
    hf = load_hf(models.resolve(name))
    for kv_f32 in (False, True):
        plain, directer = agreement(model, hf, kv_f32=kv_f32)
        print(f"{name}, KV cache {'float32' if kv_f32 else 'float16'}: identical tokens, llama.cpp vs PyTorch: "
              f"plain {plain:.1%}, DIRECTER {directer:.1%}", flush=True)


if __name__ == "__main__":
    main()
