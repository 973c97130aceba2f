"""Every documentation link points at a file inside the repository, and nothing cites the team's private notes.

Three checks, each reporting every offending ``file:line``:

(a) every ``docs/...`` or ``*.md`` path mentioned in a docstring or comment of ``hdiff/**/*.py``
    exists, resolved from the repository root. A bare ``name.md`` that the code itself writes (a
    string literal outside docstrings, e.g. the ``"report.md"`` of ``hdiff compare``) names an
    output file, not a repository file, and is exempt;
(b) every relative Markdown link or image (``[text](target)``, ``![alt](target)``, reference
    definitions ``[id]: target``, HTML ``src=`` / ``href=``) in ``README.md`` and ``docs/*.md``
    exists, resolved from the linking file's directory; ``http(s)://``/``mailto:`` links and pure
    ``#anchors`` are skipped, a ``#fragment`` or ``?query`` is stripped, and code (fenced blocks,
    inline spans) is ignored;
(c) no file under ``hdiff/`` or ``docs/``, nor ``README.md``, mentions ``DESIGN.md`` or
    ``BACKGROUND.md`` (team files that are not part of the repository).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hdiff"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PRIVATE = ("DESIGN.md", "BACKGROUND.md")

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# a path ending in .md, or any path under docs/; not preceded by a path character (so "x/docs/a" is one path)
_MD_PATH = re.compile(r"(?<![\w./-])((?:\.{1,2}/)*[\w.-]+(?:/[\w.-]+)*\.md)(?![\w/-])")
_DOCS_PATH = re.compile(r"(?<![\w./-])((?:\.{1,2}/)*docs/[\w./-]*[\w-])")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _python_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _docstring_positions(tree: ast.AST) -> set[tuple[int, int]]:
    """``(line, col)`` where each module, class and function docstring starts."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.add((body[0].lineno, body[0].col_offset))
    return found


def _prose_and_literals(path: Path) -> tuple[list[tuple[int, str]], set[str]]:
    """The comments and docstrings of a Python file as ``(first line, raw text)``, and its other string literals."""
    source = path.read_text(encoding="utf-8")
    docstrings = _docstring_positions(ast.parse(source, filename=str(path)))
    prose: list[tuple[int, str]] = []
    literals: set[str] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            prose.append((tok.start[0], tok.string))
        elif tok.type == tokenize.STRING:
            if tok.start in docstrings:
                prose.append((tok.start[0], tok.string))
            else:
                try:
                    value = ast.literal_eval(tok.string)
                except (ValueError, SyntaxError):  # f-strings and the like: keep the raw text
                    value = tok.string
                if isinstance(value, str):
                    literals.add(value)
    return prose, literals


def _mentioned_paths(text: str) -> list[tuple[int, str]]:
    """``(offset, path)`` of every ``docs/...`` or ``*.md`` path in ``text`` (URLs blanked out first)."""
    text = _URL.sub(lambda m: " " * len(m.group()), text)
    hits = {m.start(1): m.group(1) for m in _MD_PATH.finditer(text)}
    for m in _DOCS_PATH.finditer(text):
        hits.setdefault(m.start(1), m.group(1))
    return sorted(hits.items())


def _exists(target: str, base: Path) -> bool:
    path = (base / target).resolve()
    return path.exists() and (path == ROOT or ROOT in path.parents)


def test_paths_in_docstrings_and_comments_exist():
    """(a) ``docs/...`` and ``*.md`` paths in the package's docstrings and comments exist in the repository."""
    parsed = {path: _prose_and_literals(path) for path in _python_files()}
    written = {lit for _, literals in parsed.values() for lit in literals if re.fullmatch(r"[\w.-]+\.md", lit)}
    offences = []
    for path, (prose, _) in parsed.items():
        for line, raw in prose:
            for offset, target in _mentioned_paths(raw):
                if Path(target).name in PRIVATE:
                    continue  # check (c) reports these
                if "/" not in target and target in written:
                    continue  # an output file the code writes (e.g. report.md), not a repository file
                if not _exists(target, ROOT):
                    offences.append(f"{_rel(path)}:{line + raw[:offset].count(chr(10))}: {target}")
    assert not offences, "paths to files that do not exist:\n" + "\n".join(offences)


def _markdown_files() -> list[Path]:
    return ([README] if README.is_file() else []) + sorted(DOCS.glob("*.md"))


def _without_code(text: str) -> str:
    """``text`` with fenced code blocks and inline code spans blanked out (line numbers preserved)."""
    out, fence = [], None
    for line in text.split("\n"):
        stripped = line.lstrip()
        if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
            fence = stripped[:3]
            out.append("")
        elif fence is not None:
            if stripped.startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group()), line))
    return "\n".join(out)


_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
_HTML_ATTR = re.compile(r"\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def _links(text: str) -> list[tuple[int, str]]:
    """``(line, target)`` of every link target in Markdown ``text``."""
    clean = _without_code(text)
    found = []
    for pattern in (_INLINE_LINK, _REFERENCE_DEF, _HTML_ATTR):
        for m in pattern.finditer(clean):
            target = m.group(1).strip()
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1].strip()
            found.append((clean.count("\n", 0, m.start(1)) + 1, target))
    return sorted(found)


def test_markdown_links_point_to_existing_files():
    """(b) relative links and images in README.md and docs/*.md resolve to files in the repository."""
    offences = []
    for md in _markdown_files():
        for line, target in _links(md.read_text(encoding="utf-8")):
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("//") or target.startswith("#"):
                continue  # http(s), mailto and other schemes; protocol-relative URLs; same-page anchors
            path = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
            if not path:
                continue
            base = ROOT if path.startswith("/") else md.parent
            if not _exists(path.lstrip("/") if path.startswith("/") else path, base):
                offences.append(f"{_rel(md)}:{line}: {target}")
    assert not offences, "links to files that do not exist (or lie outside the repository):\n" + "\n".join(offences)


def _text_files() -> list[Path]:
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [p for p in DOCS.rglob("*") if p.is_file()] if DOCS.is_dir() else []
    files += [README] if README.is_file() else []
    return sorted(files)


def test_no_mention_of_the_team_notes():
    """(c) nothing in hdiff/, docs/ or README.md mentions DESIGN.md or BACKGROUND.md."""
    offences = []
    for path in _text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files (images, compiled files) cannot cite anything
        for number, line in enumerate(text.splitlines(), start=1):
            for name in PRIVATE:
                if name in line:
                    offences.append(f"{_rel(path)}:{number}: {name}")
    assert not offences, ("mentions of team notes that are not in the repository (point to docs/ instead):\n"
                          + "\n".join(offences))
