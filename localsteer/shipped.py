"""Where the shipped vectors and datasets are: the repository's top-level `vectors/` folder,
installed as the package `localsteer_vectors` (package data in a wheel, the folder itself in an
editable install), found through importlib.resources and never through the source tree."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def root() -> Path:
    """The shipped folder: `<model name>/` vectors, `datasets/`."""
    return Path(str(resources.files("localsteer_vectors")))


def datasets() -> Path:
    return root() / "datasets"


def model_dir(model_name: str) -> Path:
    """The shipped vectors for a known model (`vectors/<name>/`; it may not exist)."""
    return root() / model_name
