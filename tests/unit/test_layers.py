"""The import graph of ``exec_sandbox`` shows its layers: imports only point down, and never in a circle.

Layers, lowest first (a module may import from lower layers and from its own package; packages of
one layer are peers and do not import each other, except in the flat ``base`` and ``core`` layers)::

    base      errors settings timing callbacks               (no exec_sandbox imports but each other)
    protocol  protocol/        agent frames, sans-I/O
    core      models validation config
    io        client/ storage/ host/ images/ egress/ packages/  (peers)
    vm        vm/ vm_manager                                 (one guest VM)
    sandbox   sandbox/                                       (policy over many VMs; the public API)
    service   server/          sbx serve: E2B API, MCP, metrics (over the public API)
    shell     cli/             sbx (may start the service)
    facade    exec_sandbox/__init__ (lazy exports), overlay_pool, qemu_storage_daemon (re-exports)

``guest/`` runs inside the VM, where no ``exec_sandbox`` is installed: it imports only itself.
Every import counts, also the ones under ``TYPE_CHECKING`` and inside functions. A module that is
in no layer fails the test: place new modules on purpose.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "exec_sandbox"

#: (layer, flat, module prefixes). ``flat``: modules of the layer may import each other.
LAYERS: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    ("base", True, ("errors", "settings", "timing", "callbacks")),
    ("protocol", False, ("protocol",)),
    ("core", True, ("models", "validation", "config")),
    ("io", False, ("client", "storage", "host", "images", "egress", "packages")),
    ("vm", True, ("vm", "vm_manager")),
    ("sandbox", False, ("sandbox",)),
    ("service", False, ("server",)),
    ("shell", False, ("cli",)),
    ("facade", True, ("", "overlay_pool", "qemu_storage_daemon")),
)
GUEST = "guest"
MAX_LINES = 600
#: Generated code (protobuf / Connect stubs from scripts/gen_proto.sh): not written by hand, not split.
GENERATED = f"{PACKAGE}.server.proto."


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """Every ``exec_sandbox`` module ``name`` imports (``from pkg import mod`` resolves to the module)."""
    known = set(known)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
            found.update(subs or [target])
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def place(module: str) -> tuple[int, bool, str] | None:
    """``(layer index, flat, package)`` of a module, or None for the guest; KeyError if unplaced."""
    rel = module.removeprefix(PACKAGE).removeprefix(".")
    top = rel.split(".")[0]
    if top == GUEST:
        return None
    for index, (_, flat, prefixes) in enumerate(LAYERS):
        if top in prefixes and (top != "" or rel == ""):
            return index, flat, top
    raise KeyError(module)


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    problems: list[str] = []
    for module, targets in sorted(graph.items()):
        try:
            here = place(module)
        except KeyError:
            problems.append(f"{module} is in no layer (add it to LAYERS in tests/unit/test_layers.py)")
            continue
        for target in sorted(targets):
            if here is None:  # the guest
                if place_or_none(target) is not None:
                    problems.append(f"{module} (guest) imports {target}: the guest imports only itself")
                continue
            try:
                there = place(target)
            except KeyError:
                problems.append(f"{module} imports {target}, which is in no layer")
                continue
            if there is None:
                continue  # host code may refer to guest files
            layer, flat, package = here
            t_layer, _, t_package = there
            if t_layer > layer:
                problems.append(
                    f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[t_layer][0]}): upward import"
                )
            elif t_layer == layer and not flat and t_package != package:
                problems.append(f"{module} imports {target}: peers in layer {LAYERS[layer][0]!r}")
    return problems


def place_or_none(module: str) -> tuple[int, bool, str] | None:
    try:
        return place(module)
    except KeyError:
        return (len(LAYERS), False, module)


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_point_down() -> None:
    assert violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_modules_stay_small() -> None:
    big = {
        name: n
        for name, path in source_modules().items()
        if place(name) is not None
        and not name.startswith(GENERATED)
        and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}, f"modules over {MAX_LINES} lines: split them"


def test_one_exec_door() -> None:
    """Only ``SandboxVm.exec`` sends code to the agent: state check and env merge live in one place."""
    callers = []
    for name, path in source_modules().items():
        if place(name) is None or name.startswith(f"{PACKAGE}.client"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "exec"
                and "agent" in ast.unparse(node.func.value).rsplit(".", 1)[-1]
            ):
                callers.append(f"{name}:{node.lineno}")
    assert [c.split(":")[0] for c in callers] == [f"{PACKAGE}.vm.sandbox_vm"], callers


def test_the_compat_modules_are_not_imported_inside() -> None:
    graph = import_graph()
    for shim in (f"{PACKAGE}.overlay_pool", f"{PACKAGE}.qemu_storage_daemon"):
        assert [m for m, targets in graph.items() if shim in targets] == []


@pytest.mark.parametrize(
    ("module", "target", "problem"),
    [
        ("exec_sandbox.protocol.agent", "exec_sandbox.sandbox.scheduler", "upward import"),
        ("exec_sandbox.vm.sandbox_vm", "exec_sandbox.cli.run", "upward import"),
        ("exec_sandbox.errors", "exec_sandbox.models", "upward import"),
        ("exec_sandbox.client.agent", "exec_sandbox.storage.daemon", "peers"),
        ("exec_sandbox.sandbox.session", "exec_sandbox.overlay_pool", "upward import"),
        ("exec_sandbox.guest.agent", "exec_sandbox.protocol.agent", "the guest imports only itself"),
        ("exec_sandbox.newthing", "exec_sandbox.errors", "in no layer"),
    ],
)
def test_the_checker_catches(module: str, target: str, problem: str) -> None:
    graph = {**import_graph(), module: {target}}
    assert any(problem in p and p.startswith(module) for p in violations(graph)), violations(graph)


def test_the_cycle_finder_catches_a_cycle() -> None:
    graph = {**import_graph(), "exec_sandbox.errors": {"exec_sandbox.timing"}}
    graph["exec_sandbox.timing"] = {"exec_sandbox.errors"}
    assert cycles(graph) == [["exec_sandbox.errors", "exec_sandbox.timing"]]


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "exec_sandbox.cli.app" in graph["exec_sandbox.cli"]  # from x.y import z (a function)
    assert "exec_sandbox.sandbox.scheduler" in graph["exec_sandbox"]  # under TYPE_CHECKING
    assert "exec_sandbox.cli.progress" in graph["exec_sandbox.cli.run"]  # inside a function
