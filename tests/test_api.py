"""The public API: one import surface, `localsteer` (= `localsteer.api`), which the CLI and the
chat use too; nothing outside the runtime touches llama.cpp."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import localsteer
from localsteer import api

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.nomodel


def test_every_public_name_is_importable_from_the_package():
    assert set(api.__all__) <= set(localsteer.__all__)
    for name in api.__all__:
        assert getattr(localsteer, name) is getattr(api, name), name
    # the README's example names
    for name in ("load_model", "load_pairs", "extract_vector", "steering_from_specs", "generate", "sampling_config",
                 "rejection_config", "benign_kl", "train_probe", "load_gate", "ControlVector"):
        assert name in localsteer.__all__


def _imports(path: Path) -> set[str]:
    """The modules a file imports, relative imports resolved against its package."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]).replace("tui", "localsteer_tui", 1)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out |= {f"{mod}.{a.name}" if not node.module else mod for a in node.names} if node.level and not node.module \
                else {mod}
    return out


@pytest.mark.parametrize("folder", ["localsteer/cli", "tui"])
def test_the_cli_and_the_chat_go_through_the_api(folder):
    for path in sorted((ROOT / folder).rglob("*.py")):
        for mod in _imports(path):
            if mod.startswith("localsteer.") and not mod.startswith(("localsteer.api", "localsteer.cli")) \
                    and mod != "localsteer.__version__":
                pytest.fail(f"{path.relative_to(ROOT)} imports {mod}: the CLI and the chat use localsteer.api")


def test_only_the_runtime_touches_llama_cpp():
    for path in sorted((ROOT / "localsteer").rglob("*.py")) + sorted((ROOT / "tui").rglob("*.py")):
        if path.name in ("runtime.py", "__init__.py") and path.parent.name == "localsteer":
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in ("llama_cpp", "ctypes")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
