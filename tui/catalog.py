"""The vectors the steering panel offers: shipped ones for the model, the user's own, and those
named on the command line, each checked against the loaded model."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from localsteer import api
from localsteer.api import LocalsteerError, Model


@dataclass(frozen=True)
class VectorEntry:
    """One vector file as the panel shows it: off/on, strength, and whether it fits the model."""

    path: Path
    name: str
    origin: str  # "shipped", "user", "command line" or "extracted"
    scale: float = 1.0
    enabled: bool = False
    problem: str = ""  # why it does not fit the model ("" when it does)
    suggested_layers: tuple[int, ...] | None = None
    measured: str = ""  # what the vector was measured to do (its `localsteer.measured` metadata)

    @property
    def fits(self) -> bool:
        return not self.problem


def entry(model: Model, path: Path, origin: str, scale: float | None = None,
          enabled: bool = False) -> VectorEntry:
    """A panel entry for `path`; raises `LocalsteerError` when the file is not a control vector."""
    vector = api.load_vector(path)
    problem = ""
    try:
        vector.fit(model.arch, model.n_layer, model.n_embd, path.name)
    except LocalsteerError as e:
        problem = str(e)
    return VectorEntry(path, path.stem, origin, vector.suggested_scale if scale is None else scale,
                       enabled and not problem, problem, vector.suggested_layers, str(vector.meta.get("measured", "")))


def discover(model: Model, model_name: str, specs: Sequence[str], shipped_dir: Path,
             user_dir: Path) -> tuple[list[VectorEntry], list[str]]:
    """Entries for the command-line `specs` (switched on), then the shipped and user vectors
    (off); and one message per file that could not be read or does not fit."""
    entries: list[VectorEntry] = []
    problems: list[str] = []
    seen: set[Path] = set()

    def add(path: Path, origin: str, scale: float | None = None, enabled: bool = False) -> None:
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        try:
            e = entry(model, path, origin, scale, enabled)
        except LocalsteerError as err:
            problems.append(str(err))
            return
        if e.problem and origin == "command line":
            problems.append(e.problem)
        entries.append(e)

    for spec in specs:
        try:
            path, scale = api.vector_spec(spec, model)
        except LocalsteerError as err:
            problems.append(str(err))
            continue
        add(path, "command line", scale, enabled=True)
    for path in _gguf_files([shipped_dir / model_name]):
        add(path, "shipped")
    for path in _gguf_files([user_dir]):
        add(path, "user")
    return _unique_names(entries), problems


def _gguf_files(dirs: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        if d.is_dir():
            out += sorted(d.glob("*.gguf"))
    return out


def _unique_names(entries: list[VectorEntry]) -> list[VectorEntry]:
    """Two files called happy.gguf (shipped and user) are shown as happy and happy (user)."""
    names: set[str] = set()
    out = []
    for e in entries:
        name = e.name if e.name not in names else f"{e.name} ({e.origin})"
        names.add(name)
        out.append(replace(e, name=name))
    return out
