"""The import layering of `nats_apscheduler` and `cli`, read from the source's AST.

Lower layers never import higher ones (STYLE.md): errors/durations/settings at the
bottom, then cron and spec, codec, store; election and fire are siblings of the store
that import neither it nor each other; jobs, service and server on top; the CLI above
everything, through the package's public API (`nats_apscheduler.__all__`) only. A new
module must be placed in the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nats_apscheduler"
CLI = ROOT / "cli"
PKG = "nats_apscheduler"
CLI_NAMES = ("cli", "nats_cron_cli")  # the folder and the installed import package

# Rank of each module: an import must go to a strictly lower rank (no cycles, and
# modules of one rank are siblings that do not import each other).
RANK: dict[str, float] = {
    "errors": 0,
    "protocol": 0,
    "durations": 1,
    "modes": 1.5,
    "cron": 1,
    "_bridge": 1,
    "_gate": 1,
    "_tasks": 1,
    "_mirror": 1,
    "embedded": 1,
    "logs": 1,
    "observe": 1,
    "_watch": 2,
    "_kvwrite": 2,
    "_wire": 2,
    "settings": 2,
    "spec": 2,
    "words": 2,
    "web": 2,
    "_writeback": 3,
    "codec": 3,
    "connection": 3,
    "agenda": 3,
    "plan": 3,
    "delivery": 3,
    "retry": 3,
    "history": 3,
    "election": 3,
    "client": 3,
    "progress": 4,
    "events": 4,
    "fire": 5,
    "store": 4,
    "term": 6,
    "shards": 3,
    "jobs": 6,
    "scheduler": 7,
    "service": 7,
    "leadership": 8,
    "webapi": 8,
    "server": 9,
    "__init__": 10,  # the public API: re-exports only
}

# What each module may import from the package ("__init__" is `import nats_apscheduler`).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    # Protocol facts: header names, error codes, the API's subjects (nats-py's KV constants).
    "protocol": set(),
    "durations": {"errors"},
    "cron": {"errors"},
    "_bridge": {"errors"},
    "_gate": set(),  # waiting for a rising level: asyncio only
    "_tasks": set(),  # stopping tasks whose cancel can be lost: asyncio only
    "_mirror": set(),  # the store's in-memory copy: APScheduler only, no I/O
    "embedded": {"errors"},
    "logs": {"errors"},
    "observe": {"errors"},  # metrics and health probes: fed by callables, imports no layer
    "_watch": {"errors", "_gate", "_tasks", "protocol"},  # a stream watch that resumes; nats only
    "_kvwrite": {"errors", "protocol"},  # pipelined compare-and-set writes; nats only
    "_wire": {"errors"},  # protocol bytes straight to the socket
    "settings": {"errors", "durations"},
    # A job's delivery field: pure.
    "modes": {"errors", "durations"},
    "spec": {"errors", "durations", "cron", "modes"},
    # A schedule in words, for people: pure.
    "words": {"errors", "durations", "cron"},
    # The HTTP listener and its security rules (aiohttp); knows no job, only its routes.
    "web": {"observe"},
    "_writeback": {"errors", "_gate", "_tasks", "_kvwrite"},
    "codec": {"errors", "durations", "cron", "spec"},
    "connection": {"errors", "settings"},
    # The leader's schedule: triggers and marks, pure.
    "agenda": {"errors", "durations", "cron", "spec"},
    "history": {"errors", "_watch", "protocol"},
    # What a job fires, read from its document: pure.
    "plan": {"errors", "durations", "spec", "modes"},
    # Requests in flight and what their replies mean: nats only, knows nothing of jobs.
    "delivery": {"errors", "durations", "protocol"},
    # Retry records in the leader bucket and their timer: knows nothing of firing.
    "retry": {"errors", "_tasks", "_watch", "_kvwrite", "protocol"},
    # Knows nothing of APScheduler, jobs or firing.
    "election": {"errors", "durations", "_tasks", "_watch", "protocol"},
    "client": {"errors", "durations", "spec", "protocol"},
    "progress": {"errors", "_wire", "agenda", "protocol"},
    # What the events stream and the dead letter subject receive: pure.
    "events": {"errors", "_wire", "delivery", "history", "plan", "protocol"},
    # What a fire is: needs the job document and the history, not the store nor the election.
    "fire": {
        "errors",
        "durations",
        "cron",
        "spec",
        "_wire",
        "history",
        "protocol",
        "plan",
        "delivery",
        "events",
    },
    "store": {
        "errors",
        "durations",
        "cron",
        "spec",
        "codec",
        "protocol",
        "_bridge",
        "_tasks",
        "_watch",
        "_kvwrite",
        "_mirror",
        "_writeback",
    },
    # A leader's term: the agenda, the fires and the progress mark; the store through a port.
    "term": {
        "errors",
        "_tasks",
        "agenda",
        "fire",
        "progress",
        "history",
        "spec",
        "shards",
        "retry",
    },
    "jobs": {"errors", "durations", "cron", "spec", "store", "fire", "history", "agenda"},
    "scheduler": {"term"},
    # Which lease covers which jobs, who is alive, the fair share: knows nothing of firing.
    "shards": {"errors", "_tasks", "_watch", "protocol"},
    # The election adapter: leases won and lost become terms on the scheduler.
    "leadership": {
        "errors",
        "_tasks",
        "_wire",
        "_kvwrite",
        "delivery",
        "election",
        "fire",
        "history",
        "progress",
        "retry",
        "scheduler",
        "shards",
        "term",
    },
    # The API talks to the jobs manager, never to the store (KV) directly.
    "service": {"errors", "durations", "spec", "fire", "jobs", "history", "protocol"},
    # The HTTP door of the API: through the service's handlers and the jobs manager, never
    # the store (KV).
    "webapi": {"errors", "cron", "spec", "words", "jobs", "service", "observe"},
    # The composition root; settings are read at the entry points and passed down.
    "server": {
        "errors",
        "durations",
        "settings",
        "spec",
        "connection",
        "protocol",
        "_wire",
        "agenda",
        "store",
        "election",
        "fire",
        "history",
        "leadership",
        "term",
        "scheduler",
        "jobs",
        "service",
        "observe",
        "client",
        "web",
        "webapi",
        "delivery",
    },
    # The public API re-exports from public modules only.
    "__init__": {
        "errors",
        "protocol",
        "durations",
        "cron",
        "embedded",
        "logs",
        "settings",
        "spec",
        "codec",
        "connection",
        "election",
        "fire",
        "client",
        "store",
        "jobs",
        "service",
        "server",
        "observe",
        "shards",
        "history",
    },
}

# Modules that must stay pure (no I/O): no NATS client library.
PURE = {
    "errors",
    "durations",
    "cron",
    "settings",
    "spec",
    "modes",
    "codec",
    "agenda",
    "_mirror",
    "plan",
    "events",
    "words",
}


def package_modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}


def cli_modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(CLI.glob("*.py"))}


def imports(path: Path, package: str) -> list[tuple[str, int]]:
    """Every imported module name of `path` (any depth: also inside functions and
    TYPE_CHECKING blocks), relative imports resolved against `package`, with line numbers.
    `from pkg import name` yields `pkg.name`, so submodules imported that way count."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found.extend((f"{module}.{alias.name}", node.lineno) for alias in node.names)
    return found


def package_deps(path: Path, package: str) -> dict[str, int]:
    """The `nats_apscheduler` modules `path` depends on (name -> first line)."""
    modules = package_modules()
    deps: dict[str, int] = {}
    for name, line in imports(path, package):
        parts = name.split(".")
        if parts[0] != PKG:
            continue
        if len(parts) == 1:
            target = "__init__"
        elif parts[1] in modules:
            target = parts[1]
        else:
            # `from nats_apscheduler import __version__`: a name of the package itself;
            # `from nats_apscheduler.x import y` was already recorded as `x`.
            target = "__init__" if len(parts) == 2 else parts[1]
        deps.setdefault(target, line)
    return deps


def test_every_module_is_in_the_table() -> None:
    modules = set(package_modules())
    missing = modules - set(ALLOWED)
    assert not missing, f"place {sorted(missing)} in the layering table of tests/test_layers.py"
    assert set(ALLOWED) == set(RANK)
    stale = set(ALLOWED) - modules
    assert not stale, f"{sorted(stale)} no longer exist: drop them from the table"


def test_the_table_only_points_down() -> None:
    for module, allowed in ALLOWED.items():
        for dep in allowed:
            assert RANK[dep] < RANK[module], f"table: {module} may not depend on {dep}"
    # The siblings the design names explicitly.
    assert "store" not in ALLOWED["election"] | ALLOWED["fire"] | ALLOWED["term"]
    assert "fire" not in ALLOWED["election"] and "election" not in ALLOWED["fire"]
    assert "store" not in ALLOWED["service"] | ALLOWED["webapi"]
    for module in ALLOWED:
        if module not in ("connection", "server", "__init__"):
            assert "settings" not in ALLOWED[module], f"{module} must take arguments"


@pytest.mark.parametrize("module", sorted(RANK))
def test_package_module_imports_follow_the_layers(module: str) -> None:
    path = package_modules().get(module)
    if path is None:
        pytest.skip(f"{module}.py does not exist")
    deps = package_deps(path, PKG)
    deps.pop(module, None)  # e.g. `__init__` naming its own attributes
    bad = {dep: line for dep, line in deps.items() if dep not in ALLOWED[module]}
    assert not bad, "\n".join(
        f"{path.relative_to(ROOT)}:{line} imports nats_apscheduler.{dep}, "
        f"outside its layer (allowed: {sorted(ALLOWED[module])})"
        for dep, line in bad.items()
    )


@pytest.mark.parametrize("module", sorted(package_modules()))
def test_package_never_imports_the_cli_or_typer(module: str) -> None:
    path = package_modules()[module]
    for name, line in imports(path, PKG):
        top = name.split(".")[0]
        assert top not in CLI_NAMES, f"{path.name}:{line} imports the CLI ({name})"
        assert top != "typer", f"{path.name}:{line}: the library must not depend on typer"


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_modules_do_no_io(module: str) -> None:
    path = package_modules()[module]
    for name, line in imports(path, PKG):
        top = name.split(".")[0]
        assert top not in ("nats", "asyncio", "subprocess"), f"{path.name}:{line} imports {name}"


def test_election_knows_nothing_of_apscheduler() -> None:
    for name, line in imports(package_modules()["election"], PKG):
        assert name.split(".")[0] != "apscheduler", f"election.py:{line} imports {name}"


def test_only_entry_points_configure_logging() -> None:
    """The library never configures sinks: `logs` is re-exported for the applications (the
    CLI), and no library module imports it."""
    for module, path in package_modules().items():
        if module not in ("logs", "__init__"):
            assert "logs" not in package_deps(path, PKG), f"{module}.py imports logs"


def public_names() -> set[str]:
    """`nats_apscheduler.__all__`, read from the source."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise AssertionError("nats_apscheduler/__init__.py has no __all__")


@pytest.mark.parametrize("module", sorted(cli_modules()))
def test_cli_uses_only_the_public_api(module: str) -> None:
    path = cli_modules()[module]
    public = public_names()
    for name, line in imports(path, "nats_cron_cli"):
        parts = name.split(".")
        where = f"cli/{path.name}:{line}"
        if parts[0] == PKG:
            # `from nats_apscheduler import X` with X in __all__; never a submodule.
            assert len(parts) == 1 or (len(parts) == 2 and parts[1] in public), (
                f"{where} imports {name}: the CLI uses only nats_apscheduler.__all__"
            )
        # The CLI's own modules are imported relatively (or as nats_cron_cli), never as
        # `cli`, a name other distributions install too.
        assert parts[0] != "cli", f"{where} imports {name}"
        if parts[0] == "nats_cron_cli" and len(parts) > 1:
            assert parts[1] in cli_modules() or len(parts) == 3, f"{where} imports {name}"


def test_public_api_names_exist() -> None:
    import nats_apscheduler

    missing = [name for name in public_names() if not hasattr(nats_apscheduler, name)]
    assert not missing, f"__all__ names that do not exist: {missing}"


def test_the_walker_sees_real_imports(tmp_path: Path) -> None:
    """Guard against a walker that finds nothing: known edges of today's code, and the
    import forms that would otherwise slip through."""
    deps = {module: set(package_deps(path, PKG)) for module, path in package_modules().items()}
    assert {"store", "fire", "spec"} <= deps["jobs"]
    assert {"codec", "_bridge"} <= deps["store"]
    assert {"election", "service", "store", "jobs"} <= deps["server"]
    assert deps["errors"] == set()
    assert "__init__" in package_deps(CLI / "serve.py", "nats_cron_cli")
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from nats_apscheduler.election import Election\n"
        "def late():\n"
        "    import nats_apscheduler.store\n"
        "    from . import fire\n"
        "    from .jobs import JobManager\n"
        "from nats_apscheduler import service, __version__\n"
    )
    assert set(package_deps(sample, PKG)) == {
        "election",
        "store",
        "fire",
        "jobs",
        "service",
        "__init__",
    }


def _exception_classes(path: Path) -> list[str]:
    """Classes defined in `path` whose bases name an exception (…Error, …Exception)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            bases = [ast.unparse(base) for base in node.bases]
            if any(b.endswith(("Error", "Exception", "NotFound", "Conflict")) for b in bases):
                found.append(node.name)
    return found


@pytest.mark.parametrize("module", sorted(RANK))
def test_every_exception_of_the_package_lives_in_errors(module: str) -> None:
    # STYLE: one error module with the tree drawn; every exception raised on purpose is there.
    if module == "errors":
        return
    assert _exception_classes(package_modules()[module]) == []


def test_the_error_tree_draws_every_exception() -> None:
    import nats_apscheduler.errors as errors

    defined = _exception_classes(PACKAGE / "errors.py")
    assert len(defined) >= 10
    tree = errors.__doc__ or ""
    for name in defined:
        drawn = f"── {name} " in tree or f"    {name}\n" in tree  # a branch, or the root
        assert drawn, f"{name} is not in the drawn tree"
