"""The layers of docs/architecture.md hold: no module imports what its layer may not (lazy imports included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ddpo"

# layer (a sub-package or a top-level module of ddpo) -> the layers of ddpo it must never import;
# docs/architecture.md's table, where each row says why.
FORBIDDEN = {
    "core": "everything but core",
    "algorithms": {"policy", "training", "rewards", "prompts", "shapes", "cli", "api", "config"},
    "rewards": {"training", "cli", "api", "algorithms"},
    "policy": {"training", "algorithms", "rewards", "cli", "api"},
    "config": {"algorithms", "rewards", "policy", "prompts", "registry", "training", "shapes", "cli", "api"},
    "registry": "everything",
    "prompts": {"training", "algorithms", "rewards", "policy", "cli", "api"},
    "training": {"cli", "api"},
}


def _module(path: Path, package: Path = PACKAGE) -> tuple[str, bool]:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return (".".join(parts[:-1]), True) if parts[-1] == "__init__" else (".".join(parts), False)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every ddpo module `path` imports, at the top or inside a function, relative imports resolved."""
    name, is_package = _module(path, package)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("ddpo"):
                found |= {f"{module}.{alias.name}" for alias in node.names} if module == "ddpo" else {module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ddpo")}
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ddpo"


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        source = layer_of(_module(path, package)[0])
        rule = FORBIDDEN.get(source)
        if rule is None:
            continue
        for target in sorted(imports_of(path, package)):
            layer = layer_of(target)
            if layer == source:
                continue
            forbidden = rule == "everything" or (rule == "everything but core" and layer != "core") or (isinstance(rule, set) and layer in rule)
            if forbidden:
                found.append(f"{path.relative_to(package.parent)} ({source}) imports {target} ({layer})")
    return found


def test_no_module_imports_across_the_forbidden_layers():
    assert violations() == []


def test_the_check_catches_a_forbidden_import(tmp_path):
    """The check can fail: a core module that imports the policy, a config that imports a registry."""
    package = tmp_path / "ddpo"
    (package / "core").mkdir(parents=True)
    (package / "core" / "__init__.py").write_text("")
    (package / "core" / "math.py").write_text("def f():\n    from ..policy import build_policy\n")
    (package / "config.py").write_text("from ddpo.rewards import check_reward\n")
    (package / "algorithms").mkdir()
    (package / "algorithms" / "fine.py").write_text("from ddpo.core import math\n")
    assert violations(package) == [
        "ddpo/config.py (config) imports ddpo.rewards (rewards)",
        "ddpo/core/math.py (core) imports ddpo.policy (policy)",
    ]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_every_layer_in_the_rules_exists(layer):
    assert (PACKAGE / layer).is_dir() or (PACKAGE / f"{layer}.py").is_file()
