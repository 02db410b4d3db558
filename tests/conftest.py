"""Fixtures: the real small models, pulled into the cache by the install script."""

from __future__ import annotations

import pytest

from localsteer import models
from localsteer.runtime import Model


def _model_path(name: str):
    path = models.model_path(name)
    if not path.is_file():
        pytest.fail(f"{name} is not pulled: run `localsteer models pull {name}` (scripts/install.sh does)")
    return path


@pytest.fixture(scope="session")
def smol_path():
    return _model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol(smol_path):
    m = Model(smol_path)
    yield m
    m.close()


@pytest.fixture(scope="session")
def qwen05_path():
    return _model_path("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def qwen05(qwen05_path):
    m = Model(qwen05_path)
    yield m
    m.close()


@pytest.fixture(scope="session")
def gemma270_path():
    """The real Gemma-3-270m base model (gemma3, no chat template): tests/test_architectures.py."""
    return _model_path("gemma-3-270m")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (tests/test_faults.py reads which tests ran)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
