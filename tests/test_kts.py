"""KL-then-steer: a short real training run (PyTorch + transformers on the GGUF model), the
adapter loaded by llama.cpp next to the vector, lowering KL on held-out benign prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsteer import api
from localsteer.dataset import load_split_prompts
from localsteer.measure import BenignKL
from localsteer.runtime import Lora
from localsteer.vector import ControlVector

ROOT = Path(__file__).parent.parent


def kl_without_and_with(model, vector: ControlVector, prompts: list[str], adapter: Path, n_tokens: int):
    """Benign KL of `vector` alone, and with the adapter loaded (llama.cpp must accept it)."""
    bk = BenignKL(model, [api.chat_prompt(model, p) for p in prompts], n_tokens=n_tokens)
    lora = Lora(model, adapter)
    try:
        return (bk.measure(vector.directions, vector.layers),
                bk.measure(vector.directions, vector.layers, [(lora, 1.0)]))
    finally:
        lora.close()
BENIGN = load_split_prompts(ROOT / "vectors" / "datasets" / "benign.jsonl")
QWEN05 = ROOT / "vectors" / "qwen2.5-coder-0.5b-instruct"


@pytest.mark.slow
def test_short_kts_run_lowers_benign_kl_on_held_out_prompts(smol, smol_path, tmp_path):
    pytest.importorskip("torch", reason="the training extra: bash scripts/install.sh --test installs it")
    from localsteer import kts

    v = ControlVector.load(ROOT / "vectors" / "smollm2-135m-instruct" / "happy-sad.gguf")
    v = v.only_layers(v.suggested_layers) * 2.0
    texts, reference = kts.benign_sequences(smol, BENIGN["train"][:8])
    out = kts.train(smol_path, smol.arch, v, texts, tmp_path / "kts.gguf",
                    kts.KtsConfig(steps=12, batch=4, lr=3e-3), log=lambda m: None, reference=reference)
    assert out.losses[-1] < out.start_kl / 2
    # held-out prompts: the test split was never seen in training
    steered, with_kts = kl_without_and_with(smol, v, BENIGN["test"][:6], out.path, 12)
    assert with_kts < 0.6 * steered, (steered, with_kts)


def test_shipped_kts_adapter_lowers_the_refusal_vectors_benign_kl(qwen05):
    v = ControlVector.load(QWEN05 / "refusal" / "refusal-add.gguf")
    adapter = QWEN05 / "refusal" / "refusal-add-kts.gguf"
    steered, with_kts = kl_without_and_with(qwen05, v, BENIGN["test"][:4], adapter, 8)
    assert with_kts < 0.5 * steered, (steered, with_kts)


def test_kts_cli_without_torch_or_with_bad_input_is_one_line(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "localsteer.cli", "kts", "train", "-v", str(tmp_path / "none.gguf"),
                           "-o", str(tmp_path / "a.gguf")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr or "needs PyTorch" in proc.stderr


@pytest.mark.nomodel
def test_a_model_transformers_reads_otherwise_is_refused():
    torch = pytest.importorskip("torch", reason="the training extra")
    import numpy as np

    from localsteer import kts
    from localsteer.errors import LocalsteerError

    class Reads:  # a stand-in for a transformers model: fixed next-token logits
        def __init__(self, logits):
            self.logits = torch.tensor([[logits]], dtype=torch.float32)

        def __call__(self, input_ids):
            return self

    ref = np.array([4.0, 1.0, 0.0, -2.0], dtype=np.float32)
    assert kts.check_agreement(Reads(ref + 0.01), [[1, 2]], [ref], "m.gguf") < 1e-3
    with pytest.raises(LocalsteerError, match="another model than llama.cpp"):
        kts.check_agreement(Reads(ref[::-1].copy()), [[1, 2]], [ref], "m.gguf")
