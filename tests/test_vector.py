"""ControlVector as a value and as a GGUF file (pure numpy + gguf, no model needed)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from localsteer.errors import LayerRangeError, OutputExistsError, VectorError
from localsteer.vector import ControlVector, format_layers, parse_layers

pytestmark = pytest.mark.nomodel  # no model, no llama.cpp: `pytest -m nomodel` runs these in seconds


def vec(seed=0, n_layer=6, n_embd=8, arch="llama") -> ControlVector:
    return ControlVector(np.random.default_rng(seed).normal(size=(n_layer, n_embd)), arch, {"method": "mean"})


def test_layer_zero_is_always_zero_and_value_is_immutable():
    v = vec()
    assert not v.directions[0].any()
    assert v.layers == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError):
        v.directions[1, 0] = 1.0


def test_arithmetic_is_elementwise():
    a, b = vec(1), vec(2)
    np.testing.assert_allclose((a + b * 2).directions, a.directions + 2 * b.directions, rtol=1e-6)
    np.testing.assert_allclose((a - b).directions, a.directions - b.directions, rtol=1e-6)
    np.testing.assert_allclose((-a).directions, -a.directions)
    np.testing.assert_allclose(sum([a, b]).directions, (a + b).directions)
    np.testing.assert_allclose((3 * a).directions, (a * 3).directions)


def test_a_sum_with_a_case_rewrite_in_it_asks_for_the_case_fold():
    case = vec(1).with_meta(reject_fold="case")
    assert (case + vec(2)).meta["reject_fold"] == "case"
    assert (vec(2) + case).meta["reject_fold"] == "case"
    assert "reject_fold" not in (vec(1) + vec(2)).meta


def test_fold_for_turns_the_case_fold_on_when_any_vector_asks():
    from localsteer.api import fold_for
    vectors = f"{Path(__file__).parent.parent}/vectors/qwen2.5-coder-0.5b-instruct/"
    assert fold_for([vectors + "lowercase.gguf"]) == "case"
    assert fold_for([vectors + "lowercase.gguf", vectors + "exclude_word.gguf:2"]) == "case"
    assert fold_for([vectors + "exclude_word.gguf"]) == "none"


def test_adding_vectors_of_different_models_is_refused():
    with pytest.raises(VectorError, match="width"):
        vec(n_embd=8) + vec(n_embd=16)
    with pytest.raises(VectorError, match="qwen2"):
        vec(arch="llama") + vec(arch="qwen2")


def test_only_layers_zeroes_the_rest():
    v = vec().only_layers([2, 3])
    assert v.layers == (2, 3)
    assert v.meta["layers"] == "2-3"


def test_parse_and_format_layers():
    assert parse_layers("2-4,7", 10) == (2, 3, 4, 7)
    assert format_layers([2, 3, 4, 7, 9, 8]) == "2-4,7-9"
    for bad in ["0-3", "3-1", "x", "5-12", "", "1-"]:
        with pytest.raises(LayerRangeError):
            parse_layers(bad, 10)


def test_save_load_round_trip_is_exact(tmp_path):
    v = vec().with_meta(dataset="d.jsonl", n_pairs=12, scale=0.5, layers="2-4")
    path = v.save(tmp_path / "v.gguf")
    w = ControlVector.load(path)
    np.testing.assert_array_equal(w.directions, v.directions)
    assert w.arch == "llama"
    assert w.meta["dataset"] == "d.jsonl" and w.meta["n_pairs"] == 12
    assert w.suggested_scale == 0.5 and w.suggested_layers == (2, 3, 4)


def test_file_has_the_keys_llama_cpp_and_repeng_write(tmp_path):
    path = vec().save(tmp_path / "v.gguf")
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.model_hint"].contents() == "llama"
    f = r.fields["controlvector.layer_count"]
    assert f.types == [gguf.GGUFValueType.INT32] and f.contents() == 5
    names = [t.name for t in r.tensors]
    assert names == [f"direction.{i}" for i in range(1, 6)]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in r.tensors)


def _write_foreign(path, tensors: dict[str, np.ndarray], hint="llama", arch="controlvector"):
    """A file as repeng writes it: only model_hint, layer_count and direction.N tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("controlvector.model_hint", hint)
    w.add_int32("controlvector.layer_count", len(tensors))
    for name, t in tensors.items():
        w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_reads_repeng_style_files(tmp_path):
    d = np.arange(16, dtype=np.float32)
    _write_foreign(tmp_path / "r.gguf", {"direction.3": d, "direction.5": -d})
    v = ControlVector.load(tmp_path / "r.gguf")
    assert v.layers == (3, 5) and v.n_embd == 16 and v.n_layer == 6
    np.testing.assert_array_equal(v.directions[5], -d)
    fitted = v.fit("llama", 30, 16)
    assert fitted.n_layer == 30 and fitted.layers == (3, 5)


@pytest.mark.parametrize("content,match", [
    (b"not a gguf file at all", "not a GGUF file"),
    (b"", "not a GGUF file"),
])
def test_bad_files_are_refused(tmp_path, content, match):
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(VectorError, match=match):
        ControlVector.load(p)


def test_missing_file_and_layer_zero_and_no_directions(tmp_path):
    with pytest.raises(VectorError, match="not found"):
        ControlVector.load(tmp_path / "nope.gguf")
    _write_foreign(tmp_path / "z.gguf", {"direction.0": np.ones(4)})
    with pytest.raises(VectorError, match="layers start at 1"):
        ControlVector.load(tmp_path / "z.gguf")
    _write_foreign(tmp_path / "m.gguf", {"token_embd.weight": np.ones(4)}, arch="llama")
    with pytest.raises(VectorError, match="not a control vector"):
        ControlVector.load(tmp_path / "m.gguf")


def test_fit_refuses_vectors_for_other_models():
    v = vec(n_layer=6, n_embd=8)
    with pytest.raises(VectorError, match="n_embd=8"):
        v.fit("llama", 6, 16)
    with pytest.raises(VectorError, match="llama model, not qwen2"):
        v.fit("qwen2", 6, 8)
    with pytest.raises(VectorError, match="layer 5 but the model has 4"):
        v.fit("llama", 4, 8)


def test_save_never_overwrites_without_force_and_leaves_no_partial_file(tmp_path):
    p = tmp_path / "v.gguf"
    vec(1).save(p)
    before = p.read_bytes()
    with pytest.raises(OutputExistsError):
        vec(2).save(p)
    assert p.read_bytes() == before
    vec(2).save(p, force=True)
    assert p.read_bytes() != before
    bad = ControlVector(np.ones((3, 4)), "llama", {"weird": object()})
    with pytest.raises(TypeError):
        bad.save(tmp_path / "w.gguf")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["v.gguf"]
