"""What gets installed: one import name, ``tauopt``, and layers that import one way only."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Folder -> the tauopt modules its files may import. Nothing imports upward.
LAYERS: dict[str, set[str]] = {
    "models": {"tauopt.models"},
    "engine": {"tauopt.engine", "tauopt.models", "tauopt.errors"},
    "storage": {"tauopt.storage", "tauopt.errors"},
    "study": {"tauopt.study", "tauopt.engine", "tauopt.models", "tauopt.storage", "tauopt.errors"},
}
#: Third-party packages a layer must not use (the networks are pure; the engine knows no Optuna;
#: torchvision is only an extra, for the benchmarks' baselines).
FORBIDDEN: dict[str, set[str]] = {
    "models": {"optuna", "sqlalchemy", "torchvision", "tqdm", "os", "pathlib", "tauopt.errors"},
    "engine": {"optuna", "sqlalchemy", "optuna_dashboard", "torchvision"},
    "storage": {"torch", "torchvision"},
    "study": {"torchvision"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "tauopt" and len(parts) > 1 else parts[0]


#: The one module that may use Optuna's and optuna-dashboard's private names; it checks them
#: against the installed versions at start.
PRIVATE_API_MODULE = REPO / "storage" / "_optuna.py"
FOREIGN = ("optuna", "optuna_dashboard")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_foreign_names(source: str) -> list[str]:
    """Private names of Optuna or optuna-dashboard that ``source`` uses: a private module in an
    import, a private name imported, or a private attribute read off one of their modules."""
    tree = ast.parse(source)
    found: list[str] = []
    bound: set[str] = set()  # local names of their modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FOREIGN:
                    bound.add(alias.asname or alias.name.split(".")[0])
                    if any(_is_private(part) for part in alias.name.split(".")):
                        found.append(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in FOREIGN:
                continue
            if any(_is_private(part) for part in node.module.split(".")):
                found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names if _is_private(a.name)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root: ast.expr = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{ast.unparse(node.value)}.{node.attr}")
    return found


def test_the_check_for_private_names_finds_them() -> None:
    source = (
        "import optuna\nimport optuna_dashboard as od\nfrom optuna.storages import _rdb\n"
        "from optuna_dashboard import _note, save_note\n"
        "optuna.samplers._tpe.sampler\nod._serializer\noptuna.__version__\n"
    )
    assert sorted(_private_foreign_names(source)) == sorted(
        [
            "optuna.storages._rdb",
            "optuna_dashboard._note",
            "optuna.samplers._tpe",
            "od._serializer",
        ]
    )
    assert _private_foreign_names("import optuna\noptuna.create_study\nx._y\n") == []


def test_only_one_module_uses_optunas_private_names() -> None:
    files = [p for folder in (*LAYERS, "tauopt") for p in sorted((REPO / folder).glob("*.py"))]
    assert PRIVATE_API_MODULE in files
    assert _private_foreign_names(PRIVATE_API_MODULE.read_text())  # it is the one that does
    for path in files:
        if path != PRIVATE_API_MODULE:
            names = _private_foreign_names(path.read_text())
            assert not names, (
                f"{path.relative_to(REPO)} uses {names}: private names of Optuna and "
                f"optuna-dashboard belong in {PRIVATE_API_MODULE.relative_to(REPO)}, which "
                "checks them against the installed versions"
            )


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_layers_import_only_downward(folder: str) -> None:
    files = sorted((REPO / folder).glob("*.py"))
    assert files
    for path in files:
        used = {_layer_of(m) for m in _imports(path)}
        upward = {m for m in used if m.startswith("tauopt") and m not in LAYERS[folder]}
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)} (upward)"
        bad = used & FORBIDDEN.get(folder, set())
        assert not bad, f"{path.relative_to(REPO)} must not use {sorted(bad)}"


def test_the_cli_needs_no_torchvision() -> None:
    # The image installs torch alone: a torchvision import would fail there at run time.
    for path in sorted((REPO / "tauopt").glob("*.py")):
        assert "torchvision" not in {m.split(".")[0] for m in _imports(path)}, path


#: The command line's modules (tauopt/*.py): one per command family, none longer than this.
MAX_CLI_LINES = 300


def _long_modules(folder: Path, limit: int) -> list[str]:
    """``name: lines`` of every module in ``folder`` longer than ``limit`` lines."""
    lengths = {p.name: len(p.read_text().splitlines()) for p in sorted(folder.glob("*.py"))}
    return [f"{name}: {n}" for name, n in lengths.items() if n > limit]


def _module_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``folder`` (the package ``package``) that it imports, at its
    top or inside a function: ``from package import name`` imports the module ``name`` where
    there is one, else the package's ``__init__``."""
    modules = {
        package if p.stem == "__init__" else f"{package}.{p.stem}": p for p in folder.glob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        used: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                used.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    whole = f"{node.module}.{alias.name}"
                    used.add(whole if whole in modules else node.module)
        graph[name] = {m for m in used if m in modules and m != name}
    return graph


def _import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (its modules in order, the first again at the end), or
    [] where there is none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        for other in sorted(graph.get(module, ())):
            cycle = visit(other, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return []


def _private_imports(source: str, package: str) -> list[str]:
    """Private modules (or private names) of ``package``'s subpackages that ``source``
    imports: ``package.sub._x``, or ``_x`` from ``package.sub``."""

    def private(name: str) -> bool:
        parts = name.split(".")
        return parts[0] == package and len(parts) > 2 and any(map(_is_private, parts[2:]))

    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if private(alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update([node.module] if private(node.module) else filter(private, names))
    return sorted(found)


def test_the_checks_of_the_command_line_find_what_they_look_for(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("from pkg.b import x\n")
    (tmp_path / "a.py").write_text("import os\n" * (MAX_CLI_LINES + 1))
    (tmp_path / "b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "c.py").write_text("from pkg.a import y\nimport pkg.b\n")
    assert _long_modules(tmp_path, MAX_CLI_LINES) == [f"a.py: {MAX_CLI_LINES + 1}"]
    graph = _module_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.b"},
        "pkg.a": set(),
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.a", "pkg.b"},
    }
    assert _import_cycle(graph) == ["pkg.b", "pkg.c", "pkg.b"]
    assert _import_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) == []
    source = (
        "import tauopt.engine._config\nfrom tauopt.study._record import CONFIG_ATTR\n"
        "from tauopt.storage import _proxy, redact\nfrom tauopt._cli_args import warn\n"
        "from tauopt.study import load_study\nimport tauopt.errors\n"
    )
    assert _private_imports(source, "tauopt") == [
        "tauopt.engine._config",
        "tauopt.storage._proxy",
        "tauopt.study._record",
    ]


def test_no_module_of_the_command_line_is_long() -> None:
    long = _long_modules(REPO / "tauopt", MAX_CLI_LINES)
    assert not long, f"split these (one module per command family): {long}"


def test_the_command_lines_modules_import_no_circle() -> None:
    graph = _module_graph(REPO / "tauopt", "tauopt")
    assert graph["tauopt._cli"], "the parser is assembled from the command modules"
    cycle = _import_cycle(graph)
    assert not cycle, f"an import circle: {' -> '.join(cycle)}"


def test_the_command_line_uses_only_the_public_names_of_the_layers() -> None:
    for path in sorted((REPO / "tauopt").glob("*.py")):
        private = _private_imports(path.read_text(), "tauopt")
        assert not private, (
            f"{path.relative_to(REPO)} imports {private}: import the package's public names "
            "(re-exported in its __init__.py) instead"
        )


def test_errors_module_is_a_leaf() -> None:
    assert not {m for m in _imports(REPO / "tauopt" / "errors.py") if m.startswith("tauopt")}


def test_importing_the_networks_loads_no_optuna() -> None:
    code = (
        "import sys, tauopt.models; print('optuna' in sys.modules, 'tauopt.study' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    # Build from a copy of the tracked files, so the checkout gets no build/ or egg-info.
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("tauopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tauopt"}
    for module in ("models/_base.py", "engine/_train.py", "storage/_rdb.py", "study/_worker.py"):
        assert f"tauopt/{module}" in names
    assert "tauopt/__main__.py" in names and "tauopt/_cli.py" in names


def test_the_version_check_admits_what_pyproject_admits() -> None:
    import tomllib

    from tauopt.storage._optuna import SUPPORTED

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, spec in SUPPORTED.items():
        assert f"{name}{spec}" in deps, (name, spec)


def test_the_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in ("findings", "benchmarks", "reliability", "deployment", "architecture"):
        assert f"docs/{page}.md" in readme and (REPO / "docs" / f"{page}.md").is_file()
    for text in [readme, *(p.read_text() for p in (REPO / "docs").glob("*.md"))]:
        assert "session" not in text.lower()  # the project speaks of itself only


def test_no_class_of_the_study_is_a_god_class() -> None:
    for path in sorted((REPO / "study").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 250, f"{path.name}: {node.name} has {length} lines"
