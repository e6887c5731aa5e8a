"""`pip install -e .` alone gives a working `brn`: every import in brn_cli is declared in pyproject.toml.

The import graph is read from the source (every `import` statement, at module level or inside functions), not
by importing: an undeclared import that only runs inside one command (as `import click` in main() once did)
is found as well. Import names map to distributions through importlib.metadata.packages_distributions().

An import of something not declared is allowed only as an optional one: inside a function (lazy: nothing
happens until the user asks for it) and inside a `try` whose handler catches ImportError, so its absence gives
a clear line instead of a traceback -- or listed in OPTIONAL_UNGUARDED below with the reason it is safe.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "brn_cli"

# (module file relative to the repo, function, top-level import name) -> why its unguarded import is safe.
OPTIONAL_UNGUARDED = {
    ("brn_cli/data/base.py", "ImageReader.__call__", "PIL"): (
        "ImageReader is the image loader of torchvision's ImageFolder, which needs torchvision (guarded) "
        "first; torchvision depends on pillow"
    ),
    ("brn_cli/data/masks.py", "read_mask_file", "PIL"): (
        "mask files are read only for a folder of images and masks, which segmentation._folder_parts opens "
        "after its guarded import of torchvision (which depends on pillow)"
    ),
    ("brn_cli/data/segmentation.py", "_scan_folder", "PIL"): (
        "_scan_folder runs only on a SegmentationFolder, built after _folder_parts' guarded torchvision import"
    ),
    ("brn_cli/data/segmentation.py", "SegmentationFolder.__getitem__", "torchvision"): (
        "a SegmentationFolder exists only after _folder_parts' guarded torchvision import"
    ),
    ("brn_cli/data/segmentation.py", "SegmentationFolder._fit", "torchvision"): (
        "a SegmentationFolder exists only after _folder_parts' guarded torchvision import"
    ),
    ("brn_cli/data/inputs.py", "ImageFiles.__getitem__", "torchvision"): (
        "ImageFiles are built only by inputs._folder_inputs, after its guarded import of torchvision"
    ),
    ("brn_cli/data/datasets.py", "_image_folder", "torchvision"): (
        "_image_folder runs only from _load_image_folder, after its guarded import of torchvision.transforms"
    ),
    ("brn_cli/storage/checkpoint.py", "_build_known", "timm"): (
        "_build_known meets a timm: spec only after build_arch's importlib.util.find_spec('timm') check, or "
        "through is_known_builder, which knows timm's names only when timm imports"
    ),
    ("brn_cli/nn/convert.py", "restore_batchnorm", "timm"): (
        "restore_batchnorm meets a BatchRenormAct only in a model converted from timm's BatchNormAct2d, "
        "so timm was importable to build it"
    ),
    ("brn_cli/nn/triton_renorm.py", "", "triton"): (
        "the module is imported only by nn.layer._fused_channel_step, inside a try/except ImportError that "
        "falls back to the eager path; triton comes with torch's CUDA builds"
    ),
}

# Declared dependencies brn never imports itself, and why they are declared.
DECLARED_NOT_IMPORTED = {
    "onnxscript": "torch.onnx.export(dynamo=True) (`brn export onnx --exporter dynamo`) imports it",
}

# Modules that exist for an optional extra (pyproject's [project.optional-dependencies]): importing the module
# is asking for the extra, so it may import what that extra declares at module level, and try an alternative
# name in a try/except ImportError (Lightning's `lightning.pytorch`, else `pytorch_lightning`).
EXTRA_MODULES = {
    "brn_cli/integrations/lightning.py": "lightning",
    "brn_cli/integrations/hf.py": "hf",
}
# Distributions an extra declares that its module does not import itself, and why.
EXTRA_NOT_IMPORTED = {"accelerate": "transformers' Trainer imports it (and refuses to run without it)"}

# Handlers that catch a failed import.
IMPORT_ERROR_HANDLERS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return normalize(match.group(1))


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def declared_dependencies() -> dict[str, str]:
    """Normalized distribution name -> the requirement string, from [project].dependencies."""
    return {requirement_name(r): r for r in pyproject()["project"]["dependencies"]}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repo
    line: int
    top: str  # top-level module name: `import a.b` -> "a"
    scope: str  # the enclosing function's qualified name (Class.method), "" at module level
    lazy: bool  # inside a function: runs only when called
    guarded: bool  # inside a try whose handler catches ImportError


class ImportCollector(ast.NodeVisitor):
    """Every absolute import in one module with where it sits: function scope, try/except ImportError."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.imports: list[Import] = []
        self.scopes: list[tuple[str, bool]] = []  # (name, is a function)
        self.guard_depth = 0

    def _add(self, node: ast.AST, module: str) -> None:
        scope = ".".join(name for name, _ in self.scopes)
        lazy = any(is_function for _, is_function in self.scopes)
        self.imports.append(
            Import(self.file, node.lineno, module.split(".")[0], scope, lazy, self.guard_depth > 0)
        )

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:  # relative imports are brn_cli's own
            self._add(node, node.module)

    def _visit_scope(self, node: ast.AST) -> None:
        self.scopes.append((getattr(node, "name", "<lambda>"), not isinstance(node, ast.ClassDef)))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _visit_scope

    def visit_Try(self, node: ast.Try) -> None:
        guards = any(catches_import_error(h) for h in node.handlers)
        self.guard_depth += guards
        for child in node.body:
            self.visit(child)
        self.guard_depth -= guards
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    visit_TryStar = visit_Try

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):  # typing only: never runs
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in IMPORT_ERROR_HANDLERS for t in types)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in_source(file: str, source: str) -> list[Import]:
    collector = ImportCollector(file)
    collector.visit(ast.parse(source, filename=file))
    return collector.imports


def collect_imports(paths: list[Path]) -> list[Import]:
    found: list[Import] = []
    for path in paths:
        found += imports_in_source(path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8"))
    return found


def extra_dependencies(extra: str) -> dict[str, str]:
    """Normalized distribution name -> requirement, from one extra of [project.optional-dependencies]."""
    return {requirement_name(r): r for r in pyproject()["project"]["optional-dependencies"].get(extra, [])}


def undeclared_imports(imports: list[Import], declared: dict[str, str]) -> list[str]:
    """One line per import that `pip install -e .` would not satisfy and that is not a safe optional one."""
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for imp in imports:
        if imp.top in sys.stdlib_module_names or imp.top in ("__future__", "brn_cli"):
            continue
        dists = {normalize(d) for d in distributions.get(imp.top, [])}
        if dists & set(declared):
            continue
        extra = EXTRA_MODULES.get(imp.file)
        if extra and (dists & set(extra_dependencies(extra)) or imp.guarded):
            continue
        # Not declared: allowed only as an optional import, lazy and guarded, or explained.
        if (imp.file, imp.scope, imp.top) in OPTIONAL_UNGUARDED or (imp.lazy and imp.guarded):
            continue
        guarded_earlier = any(
            (o.file, o.scope, o.top) == (imp.file, imp.scope, imp.top) and o.guarded and o.line < imp.line
            for o in imports
        )
        if imp.lazy and guarded_earlier:
            continue  # runs only after a guarded import of the same module, in the same function, succeeded
        where = f"{imp.file}:{imp.line}"
        what = f"distribution {sorted(dists)}" if dists else "not installed here either"
        problems.append(
            f"{where}: import {imp.top} ({what}) is not in pyproject's dependencies: declare it, or import it"
            " inside the function in a try/except ImportError that raises a BrnError naming the package"
        )
    return problems


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_import_in_brn_cli_is_a_declared_dependency():
    imports = collect_imports(package_modules())
    assert len({i.file for i in imports}) >= 20  # the walk found the package
    assert undeclared_imports(imports, declared_dependencies()) == []


def test_each_listed_exception_is_still_an_import_there():
    imports = {(i.file, i.scope, i.top) for i in collect_imports(package_modules())}
    assert set(OPTIONAL_UNGUARDED) - imports == set()


def test_the_check_finds_an_undeclared_import_anywhere():
    """The checker itself: an `import click` inside a function (how cli.py's main() once broke a fresh
    install), a top-level import of an optional package, one that no guard covers and a guarded one in a
    class body (which runs at import time) are reported; a guarded one in a function, and the same module
    again in the function whose guarded import succeeded, are not."""
    source = (
        "import timm\n"
        "def main():\n"
        "    import click\n"
        "def optional():\n"
        "    try:\n"
        "        import torchvision.models\n"
        "    except ImportError:\n"
        "        raise SystemExit('needs torchvision')\n"
        "    from torchvision import datasets\n"
        "def unguarded():\n"
        "    from torchvision import transforms\n"
        "class Reader:\n"
        "    try:\n"
        "        import timm\n"
        "    except ImportError:\n"
        "        pass\n"
    )
    problems = undeclared_imports(imports_in_source("brn_cli/probe.py", source), declared_dependencies())
    assert [p.split(": import ")[1].split(" ")[0] for p in problems] == [
        "timm",
        "click",
        "torchvision",
        "timm",
    ]
    assert [p.split(":")[1] for p in problems] == ["1", "3", "11", "14"], problems


def test_every_declared_dependency_is_used_and_bounded():
    declared = declared_dependencies()
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for imp in collect_imports(package_modules()):
        imported |= {normalize(d) for d in distributions.get(imp.top, [])}
    assert set(declared) - imported == set(DECLARED_NOT_IMPORTED)
    for name, requirement in declared.items():
        # A lower bound brn was written against and an upper one before the next major (for typer, whose
        # breaking releases are 0.x minors, before 1.0): a new major is tried before users get it.
        assert re.search(r">=\s*\d", requirement) and re.search(r"<\s*\d", requirement), requirement
        importlib.metadata.version(name)  # installed in this environment


def test_each_extra_module_has_its_extra_bounded_and_used():
    distributions = importlib.metadata.packages_distributions()
    imports = collect_imports(package_modules())
    for file, extra in EXTRA_MODULES.items():
        requirements = extra_dependencies(extra)
        assert requirements, f"pyproject has no extra {extra!r} for {file}"
        imported = {normalize(d) for i in imports if i.file == file for d in distributions.get(i.top, [])}
        assert set(requirements) - imported <= set(EXTRA_NOT_IMPORTED), (file, requirements, imported)
        for requirement in requirements.values():
            assert re.search(r">=\s*\d", requirement) and re.search(r"<\s*\d", requirement), requirement
        # The test extra installs every extra's packages, so their tests run.
        assert set(requirements) <= set(extra_dependencies("test")), extra


def test_an_extra_module_may_import_its_extra_only():
    source = "from transformers import TrainerCallback\nimport pytorch_lightning\n"
    problems = undeclared_imports(
        imports_in_source("brn_cli/integrations/hf.py", source), declared_dependencies()
    )
    assert [p.split(": import ")[1].split(" ")[0] for p in problems] == ["pytorch_lightning"]


def test_the_console_script_is_declared():
    assert pyproject()["project"]["scripts"] == {"brn": "brn_cli.cli:main"}
