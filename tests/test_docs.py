"""The documentation: README.md stays a short front door, docs/commands.md is exactly what
scripts/commands_doc.py renders from the commands' --help, and every relative Markdown link in
README.md and docs/*.md leads to a file (and a heading) that exists. No model is needed."""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300  # 250 before the architecture table (issue 23) and the rejection targets (issue 22)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # not docs/results/

pytestmark = pytest.mark.nomodel


def _commands_doc():
    """scripts/commands_doc.py, imported from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("commands_doc", ROOT / "scripts" / "commands_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_commands_md_matches_the_help():
    expected = _commands_doc().render()
    path = ROOT / "docs" / "commands.md"
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if current != expected:
        diff = list(difflib.unified_diff(current.splitlines(), expected.splitlines(),
                                         "docs/commands.md", "the commands' --help", n=1, lineterm=""))
        shown = "\n".join(diff[:40]) + ("\n..." if len(diff) > 40 else "")
        pytest.fail("docs/commands.md does not match the commands' --help: run "
                    f"`python scripts/commands_doc.py --write`\n{shown}", pytrace=False)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines, more than {README_MAX_LINES}: it is the front "
                                   "door; move details into docs/ (guide.md, methods.md, benchmarks.md)")


def test_readme_has_the_commands_ci_runs():
    """.ci/run runs exactly the README's install, test and generate commands."""
    readme = set((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line.strip() for line in ci if line.startswith(("bash scripts/install.sh", ".venv/bin/"))]
    assert commands, ".ci/run runs no install or .venv command"
    missing = [c for c in commands if c not in readme]
    assert not missing, f"README.md does not show these .ci/run commands verbatim: {missing}"


def test_readme_lists_every_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [path for path in _commands_doc().command_paths() if f"`{path}" not in readme]
    assert not missing, f"README.md's table of commands lacks {missing}"


# --- links ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def _prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for i, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield i, line


def _paragraphs(text: str):
    """(first line number, text) of each paragraph outside fenced code blocks (a link or a code
    span may run over several lines of a paragraph, never past it)."""
    start, lines, last = 0, [], 0
    for i, line in _prose_lines(text):
        if lines and (not line.strip() or i != last + 1):
            yield start, "\n".join(lines)
            lines = []
        if line.strip():
            if not lines:
                start = i
            lines.append(line)
        last = i
    if lines:
        yield start, "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered (link targets and code marks gone),
    lowercased, punctuation dropped except '-' and '_', each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = "".join(ch for ch in text.strip().lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: heading slugs (repeats numbered -1, -2, … as on GitHub)
    and explicit <a name=…>/<a id=…> anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        found.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path):
    """(line number, target) of every link in a Markdown file's prose (not in code)."""
    for start, para in _paragraphs(path.read_text(encoding="utf-8")):
        for k, line in enumerate(para.splitlines()):
            ref = _REFERENCE.match(line)
            if ref:
                yield start + k, ref.group(1)
        # code spans go (newlines kept, for the line numbers): a link inside one is not a link
        prose = _CODE_SPAN.sub(lambda m: "``" + "\n" * m.group(0).count("\n"), para)
        for m in _LINK.finditer(prose):
            yield start + prose.count("\n", 0, m.start()), m.group(1)


def test_slug_is_githubs():
    assert slug("Instruction vectors: `localsteer extract --method instruction|rewrite` and `localsteer eval`") == \
        "instruction-vectors-localsteer-extract---method-instructionrewrite-and-localsteer-eval"
    assert slug("`localsteer models list` / `models pull NAME`") == "localsteer-models-list--models-pull-name"
    assert slug("Extraction (difference of means, PCA)") == "extraction-difference-of-means-pca"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for line, target in links(doc):
        if _SCHEME.match(target):
            continue  # a web address (http:, https:, mailto:)
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / unquote(file_part)).resolve() if file_part else doc
        where = f"{doc.relative_to(ROOT)}:{line}: {target}"
        if not dest.is_relative_to(ROOT):
            broken.append(f"{where} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(broken)
