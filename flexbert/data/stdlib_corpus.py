"""The embedded default corpus: the Python standard library installed on this machine.

Real English (pydoc topics, docstrings) and real code (module sources), tens of MB, with no
download, so the quickstart and the tests run offline. Order is deterministic: sorted files,
interleaved with the pydoc topics so that a size cap still keeps both prose and code.
"""

from __future__ import annotations

import ast
import itertools
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from flexbert.data.corpus import Document

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The stdlib directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[Path]:
    files = []
    for f in root.rglob("*.py"):
        if SKIP_DIRS.isdisjoint(f.relative_to(root).parts):
            files.append(f)
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def docstrings_of(source: str) -> str:
    """Module, class and function docstrings of one source file, joined as prose."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib test files are deliberately invalid
        return ""
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d for d in docs if d)


def _module_documents(root: Path) -> Iterator[Document]:
    for f in _module_files(root):
        rel = f.relative_to(root).as_posix()
        try:
            source = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test fixtures are not UTF-8; not worth failing over
        yield Document(f"stdlib:{rel}", source)
        doc = docstrings_of(source)
        if doc:
            yield Document(f"stdlib-doc:{rel}", doc)


def _topic_documents() -> Iterator[Document]:
    try:
        from pydoc_data import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics.topics):
        yield Document(f"pydoc:{name}", topics.topics[name])


def stdlib_documents() -> Iterator[Document]:
    """Yield the stdlib corpus: module sources, their docstrings and the pydoc topics."""
    root = stdlib_root()
    modules, topics = _module_documents(root), _topic_documents()
    for pair in itertools.zip_longest(topics, modules, modules):
        yield from (d for d in pair if d is not None)
