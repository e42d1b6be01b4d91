"""How bgq's modules import each other, read from the source with `ast` (nothing is imported).

The graph holds every import of bgq, producer, workers and celeryconfig: top-level, function-
local and `if TYPE_CHECKING:` ones alike. Its rules: no circles; `bgq` below `producer` and
`workers`; settings and the other bottom modules import nothing of bgq above them; a
function-local import of bgq's own code says why it is local; docs/architecture.md names every
module.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import tokenize
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bgq", "producer", "workers")
PROJECT = (*PACKAGES, "celeryconfig")  # celeryconfig.py: a module of its own at the root
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# The bottom of bgq: they import nothing of bgq but these (and nothing of producer or workers).
BOTTOM = (
    "bgq.defaults",
    "bgq.errors",
    "bgq.units",
    "bgq.urls",
    "bgq.quotas",
    "bgq.fileio",
    "bgq.process",
)
BOTTOM_MAY_IMPORT = {"bgq.defaults", "bgq.errors"}
# Settings sit just above them: of bgq only these, else the standard library and pydantic.
SETTINGS = "bgq.settings"
SETTINGS_MAY_IMPORT = {"bgq.defaults", "bgq.errors", "bgq.units", "bgq.urls", "bgq.quotas"}
SETTINGS_THIRD_PARTY = {"pydantic", "pydantic_settings"}

# What each top package must not import (any import, function-local or TYPE_CHECKING too).
FORBIDDEN = {
    "bgq": {"producer", "workers"},
    "workers": {"producer"},
    "celeryconfig": {"producer", "workers"},
    "producer": {"workers"},  # but for WORKERS_IN_THE_CLI
}
# `python -m bgq` runs the command line: an entry point, imported by no module, above every layer.
ENTRY_POINTS = {"bgq.__main__"}
# The producer's only imports of workers, each function-local: (importing module, imported
# module) -> why. `bgq worker` and `bgq models fetch` run on a worker's machine; every other
# command stays free of the workers' package (and of rembg and onnxruntime through it).
WORKERS_IN_THE_CLI = {
    ("producer.cli.models", "workers.models"): "fetch and check the weights (models fetch, worker)",
    ("producer.cli.models", "workers.session"): "rembg's model table without pymatting's numba",
}


@dataclass(frozen=True)
class Import:
    """One imported name's module, as an edge of the graph."""

    source: str  # the importing module
    target: str  # the imported module (a project module, or the name as written)
    line: int
    end: int  # the statement's last line
    local: bool  # inside a function: runs when called, not when the module is imported
    type_checking: bool  # under `if TYPE_CHECKING:`

    @property
    def where(self) -> str:
        kind = " (function-local)" if self.local else ""
        kind += " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{path_of(self.source)}:{self.line}: {self.source} -> {self.target}{kind}"


@functools.cache
def modules() -> dict[str, Path]:
    """Every project module by dotted name (a package by its `__init__.py`)."""
    found = {"celeryconfig": ROOT / "celeryconfig.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def path_of(module: str) -> str:
    return modules()[module].relative_to(ROOT).as_posix()


def is_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT


def resolve(name: str) -> str:
    """The module an import of `name` loads: itself, or the nearest package above it (a name
    that no module has, such as one removed, stays as written)."""
    known = modules()
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return name


class Collector(ast.NodeVisitor):
    """The imports of one module, each marked function-local and/or TYPE_CHECKING."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[Import] = []
        self.depth = 0  # functions we are inside
        self.type_checking = 0  # `if TYPE_CHECKING:` bodies we are inside

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self.visit(node.test)
        self.type_checking += guarded
        for child in node.body:
            self.visit(child)
        self.type_checking -= guarded
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(resolve(alias.name), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self.add(submodule if submodule in modules() else resolve(base), node)

    def add(self, target: str, node: ast.stmt) -> None:
        self.found.append(
            Import(
                self.module,
                target,
                node.lineno,
                node.end_lineno or node.lineno,
                self.depth > 0,
                self.type_checking > 0,
            )
        )


@functools.cache
def imports() -> tuple[Import, ...]:
    """Every import statement's edges in the project, standard library and others included."""
    found: list[Import] = []
    for module, path in modules().items():
        collector = Collector(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), str(path)))
        found.extend(collector.found)
    return tuple(dict.fromkeys(found))  # `from m import a, b`: one edge


def project_imports() -> Iterator[Import]:
    """The edges between project modules (a module importing itself aside)."""
    for edge in imports():
        if is_project(edge.target) and edge.target != edge.source:
            yield edge


def circles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {module: set() for module in modules()}
    for edge in project_imports():
        graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in graph:
                continue  # imports a module that does not exist: not part of any circle
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_graph_sees_every_kind_of_import() -> None:
    """The checks below can fail: the collector finds top-level, local and TYPE_CHECKING imports."""
    edges = list(project_imports())
    assert {edge.target for edge in edges} >= {"bgq.contract", "bgq.settings", "bgq.defaults"}
    assert any(edge.local for edge in edges), "no function-local import found"
    assert any(edge.type_checking for edge in edges), "no TYPE_CHECKING import found"
    assert len(modules()) > 50, sorted(modules())


def test_no_import_circles() -> None:
    found = circles()
    summary = "".join(f"circle: {', '.join(circle)}\n" for circle in found)
    edges = [
        f"  {edge.where}"
        for edge in project_imports()
        if any({edge.source, edge.target} <= set(circle) for circle in found)
    ]
    assert not found, "import circles (function-local and TYPE_CHECKING imports count):\n" + (
        summary + "\n".join(edges)
    )


def test_packages_import_downwards_only() -> None:
    """bgq imports neither producer nor workers; workers and celeryconfig not producer; the
    producer imports workers only where its command line runs or provisions a worker."""
    wrong = []
    for edge in project_imports():
        source, target = edge.source.split(".")[0], edge.target.split(".")[0]
        if target not in FORBIDDEN.get(source, set()) or edge.source in ENTRY_POINTS:
            continue
        if edge.local and (edge.source, edge.target) in WORKERS_IN_THE_CLI:
            continue
        wrong.append(f"  {edge.where}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_settings_import_only_the_bottom_of_bgq() -> None:
    assert SETTINGS in modules(), f"{SETTINGS} is gone: update this test"
    wrong = []
    for edge in imports():
        if edge.source != SETTINGS:
            continue
        top = edge.target.split(".")[0]
        if is_project(edge.target):
            allowed = edge.target in SETTINGS_MAY_IMPORT
        else:
            allowed = top in sys.stdlib_module_names or top in SETTINGS_THIRD_PARTY
        if not allowed:
            wrong.append(f"  {edge.where}")
    assert not wrong, (
        f"{SETTINGS} may import only {sorted(SETTINGS_MAY_IMPORT)} of bgq, the standard "
        f"library and {sorted(SETTINGS_THIRD_PARTY)}:\n" + "\n".join(wrong)
    )


def test_the_bottom_modules_import_nothing_above_them() -> None:
    missing = [module for module in BOTTOM if module not in modules()]
    wrong = [
        f"  {edge.where}"
        for edge in project_imports()
        if edge.source in BOTTOM and edge.target not in BOTTOM_MAY_IMPORT
    ]
    assert not missing, f"bottom modules missing from the tree: {missing}"
    assert not wrong, (
        f"{', '.join(BOTTOM)} may import only {sorted(BOTTOM_MAY_IMPORT)} of the project:\n"
        + "\n".join(wrong)
    )


@functools.cache
def comment_lines(path: Path) -> frozenset[int]:
    """The lines of `path` that hold a comment (on their own or after code)."""
    with path.open("rb") as source:
        return frozenset(
            token.start[0]
            for token in tokenize.tokenize(source.readline)
            if token.type == tokenize.COMMENT and is_reason(token.string)
        )


DIRECTIVES = ("noqa", "type:", "fmt:", "pragma", "pyright:", "mypy:")  # tools', not a reason


def is_reason(comment: str) -> bool:
    text = comment.lstrip("#").strip()
    return bool(text) and not text.lower().startswith(DIRECTIVES)


def has_reason(edge: Import) -> bool:
    """The convention: a comment on the import's own line(s), or on the line above it or above
    the group of imports it is in (blank lines and other imports in between)."""
    path = modules()[edge.source]
    comments = comment_lines(path)
    if comments.intersection(range(edge.line, edge.end + 1)):
        return True
    spans = {
        line
        for other in imports()
        if other.source == edge.source
        for line in range(other.line, other.end + 1)
    }
    lines = path.read_text().splitlines()
    line = edge.line - 1
    while line >= 1:
        text = lines[line - 1].strip()
        if text.startswith("#") and line in comments:
            return True
        if text and line not in spans:
            return False
        line -= 1
    return False


def test_function_local_imports_of_bgq_say_why() -> None:
    """Allowed only to keep a heavy dependency (onnxruntime, rembg, boto3, Celery, FastAPI) out of
    a light process; the comment says which (`# keeps boto3 out of ...`)."""
    silent = [
        f"  {edge.where}" for edge in project_imports() if edge.local and not has_reason(edge)
    ]
    assert not silent, (
        "function-local imports of bgq's own modules without a reason comment (on the line, or "
        "the line above the import or its group):\n" + "\n".join(silent)
    )


def aliases(module: str) -> set[str]:
    """What a reader may call a module: its path or dotted name from any of its folders down
    (`producer/api/jobs.py`, `api/jobs.py`, `jobs.py`, `producer.api.jobs`, `api.jobs`, `jobs`)."""
    parts = module.split(".")
    tails = [parts[i:] for i in range(len(parts))]
    return {"/".join(tail) + ".py" for tail in tails} | {".".join(tail) for tail in tails}


def mentions(module: str, doc: str, ambiguous: set[str]) -> bool:
    """The doc names the module: its path or dotted name anywhere, or in backticks a shorter
    alias (`api/jobs.py`, `settings`) that no other module shares."""
    full = rf"(?<![\w/.])({re.escape(path_of(module))}|{re.escape(module)})(?![\w/])"
    if re.search(full, doc):
        return True
    return any(f"`{alias}`" in doc for alias in aliases(module) - ambiguous)


def section(title: str) -> str:
    """One `## ` section of docs/architecture.md, without its heading."""
    doc = ARCHITECTURE.read_text()
    start = doc.index(f"\n## {title}\n") + len(title) + 5
    end = doc.find("\n## ", start)
    return doc[start : end if end != -1 else None]


def test_architecture_doc_names_every_module() -> None:
    doc = section("Code layout")
    listed = [
        module
        for module, path in modules().items()
        if path.name != "__init__.py" and module.split(".")[0] in PACKAGES
    ]
    counts = Counter(alias for module in listed for alias in aliases(module))
    ambiguous = {alias for alias, count in counts.items() if count > 1}
    missing = [path_of(module) for module in listed if not mentions(module, doc, ambiguous)]
    assert not missing, (
        f"{ARCHITECTURE.relative_to(ROOT)} does not name these modules by path or dotted name, "
        f"or in backticks by a shorter alias no other module shares (`api/jobs.py`, "
        f"`settings`): {missing}"
    )


def test_architecture_doc_names_no_module_that_is_gone() -> None:
    doc = section("Code layout") + section("Where producers and workers meet")
    named = set(re.findall(r"`((?:bgq|producer|workers|bench)/[\w/]*\.py)`", doc))
    gone = sorted(name for name in named if not (ROOT / name).is_file())
    assert named and not gone, f"docs/architecture.md names files that do not exist: {gone}"


def test_bgq_rows_of_the_layout_import_only_rows_above_them() -> None:
    """docs/architecture.md lists bgq's modules bottom first: the order is the layering."""
    part = section("Code layout").split("**`producer/`")[0]
    rows = re.findall(r"^\| `(bgq/[\w/.]*)` \|", part, re.M)
    rank = {row.removesuffix(".py").strip("/").replace("/", "."): i for i, row in enumerate(rows)}

    def row_of(module: str) -> int | None:
        return rank.get(module, rank.get(module.rpartition(".")[0]))  # bgq.store.s3: bgq/store/

    wrong = [
        edge.where
        for edge in project_imports()
        if edge.source.startswith("bgq.") and edge.source not in ENTRY_POINTS
        if edge.target.startswith("bgq.") and row_of(edge.source) != row_of(edge.target)
        if row_of(edge.target) is None or row_of(edge.target) >= row_of(edge.source)  # type: ignore[operator]
    ]
    assert len(rank) > 10 and not wrong, "imports of a row at or below the importer:\n" + "\n".join(
        wrong
    )


def test_where_producers_and_workers_meet_is_exact() -> None:
    """The table of docs/architecture.md lists exactly the modules both sides import."""
    users: dict[str, set[str]] = {}
    for edge in project_imports():
        side = edge.source.split(".")[0]
        if side in ("producer", "workers") and edge.target.split(".")[0] in ("bgq", "celeryconfig"):
            users.setdefault(edge.target, set()).add(side)
    shared = {path_of(m) for m, sides in users.items() if len(sides) == 2}
    shared = {
        p.removesuffix("/__init__.py") + "/" if p.endswith("__init__.py") else p for p in shared
    }
    table = set(
        re.findall(r"^\| `([\w/.]+)` \|", section("Where producers and workers meet"), re.M)
    )
    assert table == shared, (
        f"only in the table: {sorted(table - shared)}; imported by both sides but not in the "
        f"table: {sorted(shared - table)}"
    )


def test_no_module_imports_conftest() -> None:
    """conftest.py holds fixtures and hooks; what modules share lives in plain helper modules."""
    wrong = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            if any(name.split(".")[-1] == "conftest" for name in names):
                wrong.append(f"  {path.relative_to(ROOT)}:{node.lineno}")
    assert not wrong, "imports from a conftest.py:\n" + "\n".join(wrong)
