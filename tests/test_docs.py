"""Every repository path the docs and the code's comments name exists (fast: no server, no model).

Scanned: README.md and docs/*.md (plain and backticked tokens, relative Markdown links and their
anchors); the comments and docstrings of the Python files under app/, training/, bench/,
modelspec/, .ci/, tools/ and tests/; the whole text of the other files under deploy/ and .ci/, the
Makefile, the Dockerfile and compose*.yaml. A token is a repository path when it starts with one
of the top-level folders below or is one of the top-level files; tokens with placeholders or globs
(`<name>`, `*`, `{a,b}`, `…`) are skipped.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FOLDERS = (
    "app",
    "tests",
    "bench",
    "training",
    "modelspec",
    "docs",
    "deploy",
    "models",
    "examples",
    "tools",
)
TOP_FILES = (
    "Makefile",
    "Dockerfile",
    "pyproject.toml",
    "README.md",
    ".dockerignore",
    "compose.yaml",
    "compose.cpu.yaml",
    "compose.scale.yaml",
)
# A path token: not glued to a word, a dot, a slash or a dash before it (so `../shared/...`,
# `https://host/docs/...` and `src/app/...` are not taken for repository paths).
PATH_TOKEN = re.compile(
    r"(?<![\w./\-])(?:(?:\.ci|" + "|".join(FOLDERS) + r")/[\w./<>{}*,…\-\[\]]*"
    r"|" + "|".join(re.escape(f) for f in TOP_FILES) + r"(?![\w.\-]))"
)
PLACEHOLDER = re.compile(r"[<>{}*…\[\]]|\.\.\.")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")

NOT_YET: set[str] = set()  # paths named before they exist (none now)
# Written by the tools at run time and ignored by git.
GENERATED = ("bench/results/tmp/", "models/.tmp-")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_files() -> list[Path]:
    files: list[Path] = []
    for folder in ("app", "training", "bench", "modelspec", ".ci", "tests", "tools"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def _other_files() -> list[Path]:
    files = [ROOT / "Makefile", ROOT / "Dockerfile", *sorted(ROOT.glob("compose*.yaml"))]
    for folder in ("deploy", ".ci"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix != ".py")
    return files


def python_prose(source: str) -> str:
    """The comments and docstrings of a Python module, one after another."""
    parts = [
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def path_tokens(text: str) -> set[str]:
    """The repository paths a text names, placeholders and globs left out."""
    found = set()
    for match in PATH_TOKEN.finditer(text):
        token = match.group(0).rstrip(".,:;")
        if PLACEHOLDER.search(token) or token.startswith(GENERATED):
            continue
        found.add(token)
    return found


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def _missing(token: str) -> bool:
    return token not in NOT_YET and not (ROOT / token).exists()


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_path_pattern_finds_paths_and_skips_placeholders() -> None:
    text = (
        "see `app/core/edge.py`, docs/security.md. and Makefile; not ../shared/data/mnist, "
        "https://x.org/docs/a.md, models/<name>/<version>/, app/api/v2*.py, "
        "bench/results/sessions.{md,json}"
    )
    assert path_tokens(text) == {"app/core/edge.py", "docs/security.md", "Makefile"}


def test_every_path_named_in_the_docs_exists() -> None:
    broken = []
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        for token in sorted(path_tokens(text)):
            if _missing(token):
                broken.append(f"{_relative(path)}: {token}")
        for target in MARKDOWN_LINK.findall(text):
            if re.match(r"[a-z]+:|#", target):
                continue
            target, _, anchor = target.partition("#")
            linked = path.parent / target if target else path
            if not linked.exists():
                broken.append(f"{_relative(path)}: link {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{_relative(path)}: link {target}#{anchor}")
    assert not broken, "\n".join(broken)


def test_the_anchor_of_a_heading_is_githubs() -> None:
    assert (
        github_anchor("Sessions at scale (`bench.sessions`)") == "sessions-at-scale-benchsessions"
    )
    assert github_anchor("Scale stack: Redis + 2 replicas + nginx") == (
        "scale-stack-redis--2-replicas--nginx"
    )


def test_every_bench_module_is_listed_in_the_benchmark_docs() -> None:
    listed = (ROOT / "docs" / "benchmark.md").read_text(encoding="utf-8")
    modules = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "__init__.py")
    assert [p.name for p in modules if f"`bench/{p.name}`" not in listed] == []


def test_every_path_named_in_code_comments_and_docstrings_exists() -> None:
    broken = []
    for path in _python_files():
        for token in sorted(path_tokens(python_prose(path.read_text(encoding="utf-8")))):
            if _missing(token):
                broken.append(f"{_relative(path)}: {token}")
    for path in _other_files():
        for token in sorted(path_tokens(path.read_text(encoding="utf-8", errors="replace"))):
            if _missing(token):
                broken.append(f"{_relative(path)}: {token}")
    assert not broken, "\n".join(broken)
