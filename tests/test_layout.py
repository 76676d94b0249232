"""The house rules of the package layout (docs/ARCHITECTURE.md): arrows between the pipeline stages
point down only, no import cycle, and no module grows past 400 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tdrl"

#: Stage of each top-level part of tdrl; a module may import only from a strictly lower stage (or its own part).
STAGES = {
    "errors": 0,
    "integrity": 1,
    "actions": 1,
    "records": 2,
    "models": 3,
    "data": 4,
    "envs": 4,
    "agents": 4,
    "evaluation": 5,
    "training": 6,
    "testing": 6,
    "compare": 7,
    "commands": 8,
    "comparing": 9,
    "cli": 10,
    "__init__": 11,
    "__main__": 11,
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The tdrl modules ``path`` imports (``from tdrl.x import y`` counts as tdrl.x.y when that is a module)."""
    known = modules()
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tdrl":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tdrl"}
    return found


def stage(module: str) -> tuple[str, int]:
    part = module.split(".")[1] if "." in module else "__init__"
    return part, STAGES[part]


def test_every_part_of_the_package_has_a_stage():
    parts = {stage(m)[0] for m in modules()}
    assert parts <= set(STAGES), parts - set(STAGES)


def test_imports_point_down_the_pipeline_only():
    upward = []
    for module, path in modules().items():
        part, rank = stage(module)
        for target in imports(path, top_level_only=False):
            target_part, target_rank = stage(target)
            if target_part != part and target_rank >= rank:
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_import_cycle():
    graph = {m: imports(p, top_level_only=True) for m, p in modules().items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_over_400_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_readme_layout_and_the_architecture_name_every_module():
    """README's Layout section and docs/ARCHITECTURE.md stay true to the tree: each names every module."""
    import re

    root = ROOT.parent
    readme = (root / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    architecture = (root / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for path in ROOT.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        stem = path.stem
        if not re.search(rf"\b{stem}\b", layout):
            missing.append(f"README Layout: {path.relative_to(root)}")
        if f"{stem}.py" not in architecture:
            missing.append(f"docs/ARCHITECTURE.md: {path.relative_to(root)}")
    assert not missing, missing
