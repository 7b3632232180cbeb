"""The house's rules, checked: the import contracts in pyproject.toml hold (and would catch a
break), no module imports itself back through others, and no function runs past 60 lines
without a reason written above it."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
MAX_FUNCTION_LINES = 60
REASON_MARKER = "# Long because:"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` run on the tree at `root` (its pyproject.toml and app/)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(ROOT)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("app/providers/base.py", "from app.sending import accept", "know no capability"),
        ("app/db/models.py", "from app.delivery import pacing", "know no capability"),
        ("app/kernel/errors.py", "from app.senders import service", "know no capability"),
        ("app/web/deps.py", "from app.worker import tasks", "Only the worker runs jobs"),
        ("app/main.py", "from app.worker import guarantees", "Only the worker runs jobs"),
        ("app/providers/twilio.py", "from app.db import models", "the providers no database"),
        ("app/sending/accept.py", "import arq", "arq is imported by the worker package only"),
        ("app/delivery/pipeline.py", "from app.sending import routes", "Route modules are leaves"),
        ("app/senders/service.py", "from app.sending import accept", "depend one way"),
        ("app/events/outbox.py", "from app.delivery import transitions", "depend one way"),
        ("app/cli/commands.py", "from app.cli import main", "No import loops"),
    ],
)
def test_a_broken_rule_is_caught(tmp_path: Path, module: str, line: str, contract: str) -> None:
    shutil.copytree(ROOT / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")

    result = lint_imports(tmp_path)

    assert result.returncode != 0
    broken = " ".join(result.stdout.split("Broken contracts", 1)[1].split())  # unwrapped
    assert contract in broken, result.stdout


def import_loops(graph: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """The groups of modules that import each other round in a loop (Tarjan's strongly
    connected components of more than one module, or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in graph.get(module, ()):
                loops.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return loops


def app_import_graph() -> dict[str, list[str]]:
    """Which app modules each app module imports at run time (imports made only for the type
    checker are left out: they never run)."""
    graph = grimp.build_graph("app", exclude_type_checking_imports=True, cache_dir=None)
    return {
        module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules
    }


def test_no_module_imports_itself_back_through_others() -> None:
    assert import_loops(app_import_graph()) == []


def test_an_import_loop_is_found() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"], "e": ["e"]}

    assert import_loops(graph) == [["a", "b", "c"], ["e"]]


def long_functions(source: str) -> Iterator[tuple[str, int]]:
    """Functions over `MAX_FUNCTION_LINES` lines (from the first decorator to the last line)
    with no `# Long because:` comment on the line above them."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
        length = (node.end_lineno or node.lineno) - start + 1
        above = lines[start - 2].strip() if start > 1 else ""
        if length > MAX_FUNCTION_LINES and not above.startswith(REASON_MARKER):
            yield node.name, length


def test_no_function_runs_past_60_lines_without_a_reason() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{name} ({length} lines)"
        for path in sorted((ROOT / "app").rglob("*.py"))
        for name, length in long_functions(path.read_text())
    ]

    assert found == []


def test_a_long_function_is_found_unless_its_reason_is_written() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    source = f"def long():\n{body}\n\n{REASON_MARKER} a table\ndef excused():\n{body}\n"
    source += "\n\ndef short():\n    return 1\n"

    assert list(long_functions(source)) == [("long", MAX_FUNCTION_LINES + 1)]


def readme_folder_map() -> set[str]:
    """The folders under `app/` that README's Architecture section draws."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    tree = section.split("```\n", 2)[1]
    drawn: set[str] = set()
    inside_app = False
    for line in tree.splitlines():
        if line.startswith("app/"):
            inside_app = True
        elif line and not line.startswith(" "):
            inside_app = False
        elif inside_app and line.startswith("  ") and not line.startswith("   "):
            name = line.split()[0]
            if name.endswith("/"):
                drawn.add(name.rstrip("/"))
    return drawn


def test_the_readme_draws_every_folder_of_the_app() -> None:
    folders = {
        path.name
        for path in (ROOT / "app").iterdir()
        if path.is_dir() and (path / "__init__.py").exists()
    }

    assert readme_folder_map() == folders


def test_every_folder_of_the_app_is_under_the_contracts() -> None:
    """A new folder must take its place in the layers, or no contract would see it."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    folders = {
        f"app.{path.name}"
        for path in (ROOT / "app").iterdir()
        if path.is_dir() and (path / "__init__.py").exists()
    }
    layered = {
        module.strip()
        for layer in contracts[0]["layers"]
        for module in layer.replace("|", ":").split(":")
    }
    without_loops = next(c for c in contracts if c["type"] == "acyclic_siblings")["ancestors"]

    assert folders <= layered
    assert folders == set(without_loops)


def test_every_route_module_is_named_in_the_contracts() -> None:
    """Route modules stand above every service; one the contracts do not name would be judged
    as a service (or escape the "leaves" rule)."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    services = next(c for c in contracts if c["name"].startswith("Capabilities"))
    leaves = next(c for c in contracts if c["name"].startswith("Route modules"))
    routes = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "app").rglob("*routes.py")
    }

    def named(module: str, patterns: list[str]) -> bool:
        name = module.rsplit(".", 1)[1]
        return any(
            pattern in (module, f"app.*.{name}", f"{module} -> app.**", f"app.*.{name} -> app.**")
            for pattern in patterns
        )

    assert [m for m in sorted(routes) if not named(m, services["ignore_imports"])] == []
    assert [m for m in sorted(routes) if not named(m, leaves["forbidden_modules"])] == []


def test_every_module_of_the_worker_but_its_queue_is_out_of_reach() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    worker = next(c for c in contracts if c["name"].startswith("Only the worker runs jobs"))
    modules = {
        f"app.worker.{path.stem}"
        for path in (ROOT / "app" / "worker").glob("*.py")
        if path.stem not in ("__init__", "queue")
    }

    assert set(worker["forbidden_modules"]) == modules


# The folders a forbidden contract does not look at, and why: the entry points start the worker
# (app.cli through app.worker.entry; app.dev its processes); the worker imports itself and arq;
# the app factory mounts the routes.
EXEMPT = {
    "Only the worker runs jobs": {"app.__main__", "app.cli", "app.dev", "app.worker"},
    "arq is imported by the worker package only": {"app.worker"},
    "Route modules are leaves": {"app.__main__", "app.main"},
}


@pytest.mark.parametrize("contract_name", sorted(EXEMPT))
def test_each_forbidden_contract_watches_every_other_folder(contract_name: str) -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
    contract = next(c for c in contracts if c["name"].startswith(contract_name))
    everything = {
        f"app.{path.stem}"
        for path in (ROOT / "app").iterdir()
        if (path.is_dir() and (path / "__init__.py").exists())
        or (path.suffix == ".py" and path.stem != "__init__")
    }

    assert set(contract["source_modules"]) == everything - EXEMPT[contract_name]
