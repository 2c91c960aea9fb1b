"""
The layout's rules, read from the source (STYLE: "a pure edge, an I/O core"; roles as
packages). They keep the architecture true as the code grows:

1. no import cycles between modules (imports under ``if TYPE_CHECKING:`` excepted);
2. the command line is a leaf layer: click and rich only in ``listener.cli`` and
   ``listener.dev``, and nothing else imports those two packages; the daemon does not
   even load them past the entry point;
3. SQL only in ``listener.journal``: no ``sqlite3`` and no statement on the journal's
   tables anywhere else;
4. no module over 450 lines in ``listener/`` or ``handlers/``;
5. the runtime names no provider: outside ``handlers/``, ``listener/dev/`` and the
   command line (whose help cites examples), no module's code mentions one; handlers
   import nothing of ``listener``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("listener", "handlers")
MAX_LINES = 450
# Signature schemes of the contract (§5): "github" names a scheme as well as a provider.
SIGNATURE_SCHEMES = frozenset({"standard-webhooks", "stripe", "github", "hmac-sha256-hex"})
LEAVES = ("listener.cli", "listener.dev", "listener.__main__")
PROVIDERS = sorted(
    p.stem
    for p in (ROOT / "handlers").glob("*.py")
    if p.stem not in {"__init__", "base", "frames", "polling"}
)
# SQL keywords are upper case in this codebase; prose ("turned into events") is not SQL.
_SQL = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN)\s+(?:events|cursors|tombstones|poll_state|poll_aliases|poll_resources)\b"
    r"|\bCREATE\s+(?:TABLE|INDEX)\b"
)


def modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


# Parsed once, at collection: CPython 3.11's compiler can fail ("AST constructor
# recursion depth mismatch") when a warning fires during a parse, as garbage from the
# broker tests' closed connections does later in a run (see tests/conftest.py).
_TREES = {path: ast.parse(path.read_text(encoding="utf-8")) for path in modules().values()}


def tree_of(path: Path) -> ast.Module:
    """The module's syntax tree (parsed at collection)."""
    return _TREES.get(path) or ast.parse(path.read_text(encoding="utf-8"))


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, name: str, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ours that ``path`` imports at run time (lazy imports included)."""
    tree = tree_of(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skipped.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base in known:
                yield base
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    yield f"{base}.{alias.name}"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports(path, name, known)) - {name} for name, path in known.items()}


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycles() -> None:
    """No module imports itself back through others (TYPE_CHECKING imports aside)."""
    edges = graph()
    # A package's __init__ re-exports its modules: an edge into a package is an edge to
    # the modules it imports, so count them through, as Python runs them.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    # A package importing its own submodule, which imports a sibling through the
    # package name, is how re-exports work; only cycles through two modules count.
    real = [c for c in cycles if not (len(c) == 3 and c[0].startswith(c[1] + "."))]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_cli_and_dev_are_leaves() -> None:
    """click and rich appear only in listener.cli and listener.dev; nothing else imports those."""
    problems = []
    for name, path in modules().items():
        if _in(name, LEAVES):
            continue
        tree = tree_of(path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for imported in names:
                top = imported.split(".")[0]
                if top in {"click", "rich"} or _in(imported, LEAVES):
                    problems.append(f"{name} imports {imported}")
    assert not problems, problems


def test_the_daemon_does_not_load_click_or_the_dev_tools() -> None:
    """Importing the service (what `listener run` starts) loads no click and no dev tool."""
    # (structlog imports rich by itself when it is installed, for tracebacks: that is
    # not ours to avoid; no module of ours outside the leaves imports it.)
    code = (
        "import sys, listener.service, listener.admin.app;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'click'"
        " or m.startswith('listener.dev') or m.startswith('listener.cli')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_listener_run_loads_no_other_command() -> None:
    """The command line imports a command's module only when it runs: `run` loads no demo."""
    code = (
        "import sys; from listener.cli import main; main.get_command(None, 'run');"
        "print(sorted(m for m in sys.modules if m.startswith(('listener.dev', 'listener.ops'))"
        " or m in {'listener.cli.replay', 'listener.cli.demo', 'listener.cli.quarantine'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_sql_lives_in_the_journal_package() -> None:
    """sqlite3 and statements on the journal's tables appear only in listener.journal."""
    problems = []
    for name, path in modules().items():
        if _in(name, ("listener.journal",)):
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(?:import sqlite3|from sqlite3 import)", text, re.MULTILINE):
            problems.append(f"{name} imports sqlite3")
        problems.extend(f"{name}: {match.group(0)!r}" for match in _SQL.finditer(text))
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name: str) -> None:
    """No module is over 450 lines (STYLE: one concept per module)."""
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_runtime_names_no_provider() -> None:
    """Outside handlers/, the dev tools and the command line, no module's code names a provider."""
    assert {"getstoken", "layerx402"} <= set(PROVIDERS)
    problems = []
    word = re.compile(r"\b(" + "|".join(PROVIDERS) + r")\b")
    for name, path in modules().items():
        if _in(name, ("handlers", "listener.dev", "listener.cli")):
            continue
        # Docstrings and comments may cite the contract's examples; code may not.
        tree = tree_of(path)
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and node.value not in SIGNATURE_SCHEMES
            ):
                if found := word.search(node.value):
                    problems.append(f"{name}: {found.group(0)!r} in {node.value[:60]!r}")
            elif isinstance(node, ast.Name | ast.Attribute):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                if word.fullmatch(ident):
                    problems.append(f"{name}: names {ident}")
            elif isinstance(node, ast.ImportFrom) and node.module and word.search(node.module):
                problems.append(f"{name}: imports {node.module}")
    assert not problems, problems


def test_handlers_are_pure() -> None:
    """handlers/ imports nothing of listener/ (the pure edge knows no runtime)."""
    problems = [
        f"{name} imports {imported}"
        for name, edges in graph().items()
        if name.startswith("handlers")
        for imported in edges
        if imported.startswith("listener")
    ]
    assert not problems, problems
