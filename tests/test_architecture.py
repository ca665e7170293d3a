"""The structure rules of ``docs/architecture.md``, checked on the source itself.

The import rules are read from the document's ``import-rules`` block, so the map a newcomer
reads and the rules the suite enforces cannot drift apart. Imports are found statically (AST),
including the lazy ones inside functions: a core module that imports transformers only inside
one function still breaks the rule.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_REASON = "# long:"  # a function past the limit says why, in a comment inside it


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "finitetune").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_statements(module: str, path: Path):
    """(imported module, names imported from it) for every import statement of the file;
    ``import a.b`` gives ("a.b", []), relative imports are made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base, [alias.name for alias in node.names]


def _imports(module: str, path: Path) -> set[str]:
    """Every module name the file imports (``from a.b import c`` gives a.b and a.b.c)."""
    found: set[str] = set()
    for base, names in _import_statements(module, path):
        found.add(base)
        found.update(f"{base}.{name}" for name in names)
    return found


def _rules() -> list[tuple[str, list[str]]]:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"```import-rules\n(.*?)```", text, re.S)
    assert block, f"{DOC} has no ```import-rules block"
    rules = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pattern, _, banned = line.partition(" may not import ")
            rules.append((pattern.strip(), [b.strip() for b in banned.split(",") if b.strip()]))
    return rules


RULES = _rules()
MODULES = _modules()


@pytest.mark.parametrize(("pattern", "banned"), RULES, ids=[r[0] for r in RULES])
def test_import_rule(pattern, banned):
    matched = [m for m in MODULES if fnmatch.fnmatchcase(m, pattern)]
    assert matched, f"rule {pattern!r} matches no module: update docs/architecture.md"
    broken = []
    for module in matched:
        for name in sorted(_imports(module, MODULES[module])):
            for ban in banned:
                if fnmatch.fnmatchcase(name, ban) or name.startswith(ban + "."):
                    broken.append(f"{module} imports {name} (banned: {ban})")
    assert not broken, "\n".join(broken)


def test_every_module_is_on_the_map():
    """A new module is added to docs/architecture.md's map (so the map stays current)."""
    text = DOC.read_text(encoding="utf-8")
    missing = [str(path.relative_to(SRC / "finitetune")) for path in MODULES.values()
               if path.name != "__init__.py"
               and f"`{path.relative_to(SRC / 'finitetune')}`" not in text]
    assert not missing, f"modules missing from docs/architecture.md: {missing}"


def test_modules_and_functions_stay_small():
    too_long = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {len(lines)} lines (> {MAX_MODULE_LINES}): split it")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                body = "\n".join(lines[node.lineno - 1: node.end_lineno])
                if length > MAX_FUNCTION_LINES and LONG_REASON not in body:
                    too_long.append(f"{module}.{node.name}: {length} lines without a "
                                    f"'{LONG_REASON} <why>' comment")
    assert not too_long, "\n".join(too_long)



MAX_ROOT_MODULES = 8


def _edges() -> dict[str, set[str]]:
    """Module -> the finitetune modules it imports (module level, inside functions, and under
    ``TYPE_CHECKING``). ``from a import b`` names the module ``a.b`` when that is a module, else
    ``a``; a package's lazy re-exports (strings) are not imports."""
    edges: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        names: set[str] = set()
        for base, imported in _import_statements(module, path):
            if not imported:
                names.add(base)
            for name in imported:
                names.add(f"{base}.{name}" if f"{base}.{name}" in MODULES else base)
        targets = set()
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("finitetune") and name != module:
                targets.add(name)
        edges[module] = targets
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    """No two modules import each other, directly or through others, not even inside a
    function: a circle hidden in a function-level import is still a circle."""
    cycles = _cycles(_edges())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_circle():
    """The circle check can fail: a planted a -> b -> c -> a is reported, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_package_root_stays_small():
    """A concept gets its package: the root holds only the shared foundations."""
    root = sorted(p.name for p in (SRC / "finitetune").glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, f"{len(root)} modules at the package root: {root}"


def test_import_rules_cover_every_package():
    """Each package of the tree has at least one import rule (the map says what it may use)."""
    packages = sorted({m for m, p in MODULES.items() if p.name == "__init__.py"} - {"finitetune"})
    uncovered = [pkg for pkg in packages
                 if not any(fnmatch.fnmatchcase(m, pattern) for pattern, _ in RULES
                            for m in MODULES if m == pkg or m.startswith(pkg + "."))]
    assert not uncovered, f"packages without an import rule in docs/architecture.md: {uncovered}"


# Underscore names of the standard library that are public API in all but name.
STDLIB_PRIVATE = {
    "_replace": "namedtuple._replace, documented namedtuple API",
    "_asdict": "namedtuple._asdict, documented namedtuple API",
    "_SubParsersAction": "argparse's type of add_subparsers(), for the verbs' annotations",
}


def _listed_private_names() -> set[str]:
    """Every underscore name some seam list holds (the last part of each dotted name)."""
    from finitetune.integrations.deepspeed.engine import SEAMS as DEEPSPEED
    from finitetune.integrations.hf.seams import SEAMS as LIBRARIES
    from finitetune.numerics.torch_seams import TORCH_SEAMS

    names = {seam.name.split("(")[0] for seam in LIBRARIES}
    names |= {name for attrs in DEEPSPEED.values() for name in attrs}
    for dotted in TORCH_SEAMS:
        names.update(dotted.split("."))
    return names | set(STDLIB_PRIVATE)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses() -> dict[str, list[str]]:
    """Underscore names finitetune uses on objects it does not own: attributes of anything but
    ``self``/``cls`` (read, written or wrapped), names in ``getattr``-style calls, private
    names imported from other packages, and private modules; minus the names finitetune itself
    defines (functions, classes, ``self._x`` attributes, variables)."""
    defined: set[str] = set()
    uses: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{module}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    if isinstance(node.ctx, ast.Store):
                        defined.add(node.attr)
                else:
                    uses.setdefault(node.attr, []).append(where)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                  and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
                uses.setdefault(node.args[1].value, []).append(where)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                base = getattr(node, "module", None) or ""
                if base.startswith("finitetune") or getattr(node, "level", 0):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    for part in full.split("."):
                        if _private(part):
                            uses.setdefault(part, []).append(where)
    return {name: where for name, where in uses.items() if name not in defined}


def test_every_private_library_name_is_listed():
    """A private (underscore) name of transformers, accelerate, PEFT, DeepSpeed or torch is
    used only if a seam list holds it, with its versions and reason: the start-up checks and
    the version matrix cover exactly what the code relies on."""
    unlisted = {name: where for name, where in _private_uses().items()
                if name not in _listed_private_names()}
    assert not unlisted, "private names used but in no seam list:\n" + "\n".join(
        f"{name}: {', '.join(where[:3])}" for name, where in sorted(unlisted.items()))


def test_the_private_name_scan_finds_a_planted_use(tmp_path, monkeypatch):
    """The scan can fail: a module that reads a library's ``_secret`` is reported."""
    planted = tmp_path / "planted.py"
    planted.write_text("import torch\n\ndef f(x):\n    return x._secret + torch._other\n")
    monkeypatch.setitem(MODULES, "finitetune.planted", planted)
    uses = _private_uses()
    assert "_secret" in uses and "_other" in uses
