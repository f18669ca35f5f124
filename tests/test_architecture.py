"""The layering that ARCHITECTURE.md describes: every hf_ddpm module imports only from its own layer or those above
it, and the package has no import cycle."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "hf_ddpm"
#: module (or package prefix) -> layer, as in ARCHITECTURE.md; a module's layer is that of its longest prefix.
LAYERS = {
    "hf_ddpm.distributions": 1,
    "hf_ddpm.image_utils": 1,
    "hf_ddpm.config_checks": 1,
    "hf_ddpm.vae": 2,
    "hf_ddpm.ddpm": 3,
    "hf_ddpm.vdm": 3,
    "hf_ddpm.probability_flow": 3,
    "hf_ddpm.models": 4,
    "hf_ddpm.evaluation": 5,
    "hf_ddpm.hub.naming": 6,
    "hf_ddpm.hub.loading": 6,
    "hf_ddpm.hub.registration": 6,
    "hf_ddpm.pipelines": 7,
    "hf_ddpm.hub": 8,
    "hf_ddpm.objectives": 9,
    "hf_ddpm.training_utils": 9,
    "hf_ddpm.training_budget": 9,
    "hf_ddpm.sampling_speedup": 9,
    "hf_ddpm.posthoc_ema": 9,
    "hf_ddpm.guide_snapshot": 9,
    "hf_ddpm.training_args": 9,
    "hf_ddpm.dataclass_flags": 9,
    "hf_ddpm.data": 9,
    "hf_ddpm.data.emoji": 9,
    "hf_ddpm.metrics": 9,
    "hf_ddpm.plots": 9,
    "hf_ddpm.demo": 10,
    "hf_ddpm.cli": 10,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    if module == "hf_ddpm":  # the public names of the package: for entry points only
        return 10
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} has no layer in ARCHITECTURE.md: add it there and to LAYERS"
    return LAYERS[max(prefixes, key=len)]


def package_imports(path: Path) -> set[str]:
    """The hf_ddpm modules a file imports (relative imports resolved), at any depth of the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = (
                importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                if node.level
                else node.module
            )
            if target and target.split(".")[0] == "hf_ddpm":
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "hf_ddpm")
    return found


MODULES = sorted(p for p in SOURCE.rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_from_a_lower_layer(path):
    module = module_name(path)
    upward = {target for target in package_imports(path) if layer_of(target) > layer_of(module)}
    assert not upward, f"{module} (layer {layer_of(module)}) imports from later layers: {sorted(upward)}"


def test_the_package_has_no_import_cycle():
    graph = {module_name(p): {t for t in package_imports(p) if t != "hf_ddpm"} for p in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(trail + [module])}"
        state[module] = "open"
        for target in graph.get(module, ()):
            visit(target, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_the_vae_imports_no_diffusion_code():
    for path in (SOURCE / "vae").rglob("*.py"):
        assert not {t for t in package_imports(path) if t.startswith(("hf_ddpm.vdm", "hf_ddpm.models"))}, path


def test_the_ddpm_and_the_vdm_import_neither_each_other_nor_a_network():
    for package, other in (("ddpm", "hf_ddpm.vdm"), ("vdm", "hf_ddpm.ddpm")):
        for path in (SOURCE / package).rglob("*.py"):
            imported = package_imports(path)
            assert not {t for t in imported if t.startswith((other, "hf_ddpm.models"))}, path


def imports_train_script(path: Path) -> bool:
    """Whether a file imports ``train`` (training/train.py) or puts training/ on sys.path to do so."""
    text = path.read_text()
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "train" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "train" and not node.level:
            return True
    return re.search(r"sys\.path\.(insert|append)\([^)]*training", text) is not None


@pytest.mark.parametrize("folder", ["src", "benchmarks"])
def test_nothing_in_the_library_or_the_benchmarks_imports_training_train_py(folder):
    """train.py imports everything and nothing imports it (tests may run it: they are its users)."""
    files = sorted((SOURCE.parents[1] / folder).rglob("*.py"))
    assert files and not [str(p) for p in files if imports_train_script(p)]
