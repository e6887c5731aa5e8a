"""The package layout docs/design.md draws, checked on the source: imports go one way, the terminal stays in
the top layers, functions stay short enough to read, and `brn --help` does not import torch.

Imports are read with `ast` (every import statement, inside functions too, and `importlib.import_module`
of a literal name; `if TYPE_CHECKING:` blocks are left out: they never run). Each failure names the file, the
line and both ends of the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "brn_cli"

# Lowest first. A module may import from its own unit or from any lower layer; units that share a layer are
# siblings and do not import each other.
LAYERS: list[set[str]] = [
    {"brn_cli.errors", "brn_cli._version", "brn_cli.progress", "brn_cli.samples"},
    {"brn_cli.nn"},
    {"brn_cli.storage"},
    {"brn_cli.data", "brn_cli.tasks"},
    {"brn_cli.evaluation", "brn_cli.deploy"},
    {"brn_cli.train"},
    {"brn_cli.recipes"},
    {"brn_cli.cli"},
    {"brn_cli.__main__"},  # `python -m brn_cli`
    # Trainer callbacks, optional extras: they use the library; nothing imports them (top layer).
    {"brn_cli.integrations"},
]
FACADE = "brn_cli"  # brn_cli/__init__.py: the public API, imported lazily by name
UI_UNITS = ("brn_cli.cli", "brn_cli.recipes")
UI_LIBRARIES = ("typer", "rich", "click")
INTEGRATION_UNIT = "brn_cli.integrations"
INTEGRATION_LIBRARIES = ("lightning", "pytorch_lightning", "transformers", "accelerate")
MAX_FUNCTION_LINES = 80  # a function: from its `def` line to its last line
MAX_COMMAND_BODY_LINES = 60  # a CLI command: its statements after the signature (its options) and docstring


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    source: str  # the importing module, dotted
    target: str  # what it imports: a brn_cli module (resolved), or a third-party dotted name

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = package_modules()


def resolve(dotted: str) -> str:
    """The brn_cli module a dotted name lives in (the longest prefix that is a module), or the name itself."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in MODULES:
            return prefix
    return dotted


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _is_type_checking(child))


def _from_base(node: ast.ImportFrom, module: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, source: str | None = None) -> list[Import]:
    text = path.read_text(encoding="utf-8") if source is None else source
    found: list[Import] = []
    for node in _runtime_nodes(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, module, resolve(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, path)
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod
                submodule = f"{base}.{alias.name}"
                target = submodule if submodule in MODULES else resolve(base)
                found.append(Import(path, node.lineno, module, target))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            found.append(Import(path, node.lineno, module, resolve(node.args[0].value)))
    return sorted((imp for imp in found if imp.target != module), key=lambda imp: imp.line)


ALL_IMPORTS = [imp for module, path in MODULES.items() for imp in imports_of(module, path)]


def internal(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if imp.target in MODULES]


def unit_of(module: str) -> str | None:
    """The layered unit (package or top-level module) that `module` belongs to; None for the facade."""
    for layer in LAYERS:
        for unit in layer:
            if module == unit or module.startswith(unit + "."):
                return unit
    return None


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each as a sorted list."""
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


def cycle_problems(imports: list[Import], key) -> list[str]:
    """Import cycles between the nodes `key` maps modules to (the module itself, or its package)."""
    edges: dict[str, set[str]] = {}
    links = [imp for imp in internal(imports) if key(imp.source) and key(imp.target)]
    links = [imp for imp in links if key(imp.source) != key(imp.target)]
    for imp in links:
        edges.setdefault(key(imp.source), set()).add(key(imp.target))
    problems = []
    for component in _cycles(edges):
        lines = sorted(
            {
                f"  {imp.where()}: {imp.source} imports {imp.target} "
                f"({unit_of(imp.source)} -> {unit_of(imp.target)})"
                for imp in links
                if key(imp.source) in component and key(imp.target) in component
            }
        )
        problems.append("import cycle between " + ", ".join(component) + ":\n" + "\n".join(lines))
    return problems


def layer_problems(imports: list[Import]) -> list[str]:
    problems = []
    for imp in internal(imports):
        mine, theirs = unit_of(imp.source), unit_of(imp.target)
        if imp.target == FACADE and imp.source != FACADE:
            problems.append(
                f"{imp.where()}: {imp.source} imports the package facade brn_cli "
                f"(package {mine} -> brn_cli/__init__.py); import the name from the module that defines it"
            )
        elif imp.source == FACADE and theirs is not None and layer_of(theirs) > 0:
            problems.append(
                f"{imp.where()}: brn_cli/__init__.py imports {imp.target} (package {theirs}); the facade "
                "runs before every module, so it imports only the bottom layer and the rest by name"
            )
        elif mine is None or theirs is None or mine == theirs:
            continue
        elif layer_of(theirs) > layer_of(mine):
            problems.append(f"{imp.where()}: {imp.source} imports {imp.target} (upward: {mine} -> {theirs})")
        elif layer_of(theirs) == layer_of(mine):
            problems.append(
                f"{imp.where()}: {imp.source} imports {imp.target} (siblings: {mine} -> {theirs})"
            )
    return problems


def ui_problems(imports: list[Import]) -> list[str]:
    return [
        f"{imp.where()}: {imp.source} imports {imp.target} "
        f"(package {unit_of(imp.source) or imp.source} -> {imp.target.split('.')[0]}; "
        f"only {' and '.join(UI_UNITS)} know the terminal)"
        for imp in imports
        if imp.target.split(".")[0] in UI_LIBRARIES and not imp.source.startswith(UI_UNITS)
    ]


def integration_problems(imports: list[Import]) -> list[str]:
    """Trainer frameworks are optional extras: only brn_cli.integrations may import them."""
    return [
        f"{imp.where()}: {imp.source} imports {imp.target} "
        f"(only {INTEGRATION_UNIT} imports the optional trainer frameworks)"
        for imp in imports
        if imp.target.split(".")[0] in INTEGRATION_LIBRARIES and unit_of(imp.source) != INTEGRATION_UNIT
    ]


def _is_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Registered on a typer app: `@app.command(...)`, `@app.callback(...)` or the bare attribute."""
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr in ("command", "callback"):
            return True
    return False


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def length_problems(path: Path, source: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8") if source is None else source
    rel = path.relative_to(REPO)
    problems = []
    for node in _functions(ast.parse(text, filename=str(path))):
        if _is_command(node):
            if _body_lines(node) > MAX_COMMAND_BODY_LINES:
                problems.append(
                    f"{rel}:{node.lineno}: command {node.name} has a {_body_lines(node)}-line body "
                    f"(limit {MAX_COMMAND_BODY_LINES})"
                )
        elif node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
            length = node.end_lineno - node.lineno + 1
            problems.append(
                f"{rel}:{node.lineno}: {node.name} is {length} lines (limit {MAX_FUNCTION_LINES})"
            )
    return problems


def test_every_module_has_a_place_in_the_layers():
    homeless = [m for m in MODULES if m != FACADE and unit_of(m) is None]
    assert not homeless, (
        f"modules outside every layer of tests/test_layout.py (and docs/design.md): {homeless}; "
        "put each in a package of the diagram, or add its layer to both"
    )


def test_no_import_cycle_between_modules():
    problems = cycle_problems(ALL_IMPORTS, key=lambda module: module)
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_packages():
    problems = cycle_problems(ALL_IMPORTS, key=unit_of)
    assert not problems, "\n".join(problems)


def test_imports_point_down_the_layers():
    problems = layer_problems(ALL_IMPORTS)
    assert not problems, "\n".join(problems)


def test_only_cli_and_recipes_import_typer_rich_or_click():
    problems = ui_problems(ALL_IMPORTS)
    assert not problems, "\n".join(problems)


def test_only_integrations_import_lightning_or_transformers():
    assert any(unit_of(i.source) == INTEGRATION_UNIT for i in ALL_IMPORTS if "lightning" in i.target)
    problems = integration_problems(ALL_IMPORTS)
    assert not problems, "\n".join(problems)
    planted = imports_of("brn_cli.train.planted", PACKAGE / "train" / "planted.py", "import transformers\n")
    assert integration_problems(planted) == [
        "brn_cli/train/planted.py:1: brn_cli.train.planted imports transformers "
        "(only brn_cli.integrations imports the optional trainer frameworks)"
    ]


def test_functions_and_commands_are_short():
    problems = [p for path in MODULES.values() for p in length_problems(path)]
    assert not problems, "\n".join(problems)


PLANTED = (
    """\
from typing import TYPE_CHECKING

import rich

if TYPE_CHECKING:
    from brn_cli.cli.app import app


def long_helper():
    from brn_cli.train import finetune

    return finetune
"""
    + "    pass\n" * MAX_FUNCTION_LINES
)


def test_the_checks_find_what_they_look_for():
    """Each rule run on a planted module in nn/ (with the real tree around it) reports that module, and
    the real tree has what the rules read: imports between packages, typer, and the commands."""
    path = PACKAGE / "nn" / "planted.py"
    planted = imports_of("brn_cli.nn.planted", path, PLANTED)
    assert [imp.target for imp in planted] == ["typing", "rich", "brn_cli.train.finetune"]  # no TYPE_CHECKING
    assert layer_problems(planted) == [
        "brn_cli/nn/planted.py:10: brn_cli.nn.planted imports brn_cli.train.finetune "
        "(upward: brn_cli.nn -> brn_cli.train)"
    ]
    assert ui_problems(planted) == [
        "brn_cli/nn/planted.py:3: brn_cli.nn.planted imports rich "
        "(package brn_cli.nn -> rich; only brn_cli.cli and brn_cli.recipes know the terminal)"
    ]
    assert length_problems(path, PLANTED) == [
        f"brn_cli/nn/planted.py:9: long_helper is {MAX_FUNCTION_LINES + 4} lines (limit {MAX_FUNCTION_LINES})"
    ]
    back = Import(PACKAGE / "train" / "finetune.py", 1, "brn_cli.train.finetune", "brn_cli.nn.planted")
    MODULES["brn_cli.nn.planted"] = path
    try:
        cycles = cycle_problems([*planted, back], key=unit_of)
    finally:
        del MODULES["brn_cli.nn.planted"]
    assert len(cycles) == 1 and cycles[0].startswith("import cycle between brn_cli.nn, brn_cli.train:")
    assert "brn_cli/nn/planted.py:10:" in cycles[0] and "brn_cli/train/finetune.py:1:" in cycles[0]

    assert any(unit_of(i.source) == "brn_cli.cli" and unit_of(i.target) == "brn_cli.nn" for i in ALL_IMPORTS)
    assert any(i.target.split(".")[0] == "typer" for i in ALL_IMPORTS)
    commands = [
        node.name
        for module, path in MODULES.items()
        if module.startswith("brn_cli.cli")
        for node in _functions(ast.parse(path.read_text(encoding="utf-8")))
        if _is_command(node)
    ]
    assert len(commands) >= 10, commands


# What `brn --help` must not import; a meta-path hook records which brn_cli line asked for it first.
HELP_PROBE = """
import sys, traceback

class Watch:
    first = None
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and Watch.first is None:
            Watch.first = [
                f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "brn_cli" in f.filename
            ]
        return None

sys.meta_path.insert(0, Watch())
from brn_cli.cli import main
code = None
try:
    main(["--help"])
except SystemExit as exc:
    code = exc.code
print("EXIT", code)
print("TORCH", "torch" in sys.modules, Watch.first)
"""


def test_brn_help_does_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "EXIT 0" in proc.stdout and "Usage: brn" in proc.stdout, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("TORCH False"), (
        "`brn --help` imported torch; the import chain (brn_cli frames, outermost first): " + last
    )
