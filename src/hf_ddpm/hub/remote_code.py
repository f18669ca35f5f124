"""The self-contained copy of hf_ddpm that a Hub repo ships, generated from hf_ddpm's own modules at push time.

Stock diffusers (hf_ddpm not installed) loads a component recorded as ``["hf_ddpm", "DenoisingUNet"]`` from the
repo file ``unet/hf_ddpm.py``, and the pipeline from ``hf_ddpm.py`` at the repo root, which the repo's
``model_index.json`` names as ``["hf_ddpm", ClassName]``, when called with ``trust_remote_code=True`` (repos pushed
before that record also load with ``custom_pipeline="hf_ddpm"``). It imports each such file as one module on its
own, so the file can import neither hf_ddpm nor a sibling file. :func:`bundle_source` writes that module: the
hf_ddpm modules that define the given classes and every hf_ddpm module they import, in dependency order, each
with its imports from hf_ddpm removed (the names they imported are defined earlier in the same file). Nothing is
copied by hand, so the remote code is always the code that wrote the weights; :func:`remote_code_files` says
where the copies go.

The rules that make a module bundleable, checked here with an error that names the module and line: import from
hf_ddpm only at module level, only names (``from ..ddpm.elbo import full_elbo``, not ``from .. import vdm``), without
renaming them; no two bundled modules may bind one public top-level name to different things (private ones,
``_name``, are renamed apart in the bundle: each module keeps its own helpers); and together they define at most
one pipeline class.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from .naming import PACKAGE, library_of

#: File name of the bundle; also the ``custom_pipeline`` name stock diffusers is given (``"hf_ddpm"``).
REMOTE_CODE_FILENAME = f"{PACKAGE}.py"
FUTURE_IMPORT = "from __future__ import annotations"
#: Module-level name under which the bundle records the hash of its content.
ID_NAME = "HF_DDPM_REMOTE_CODE_ID"


class RemoteCodeError(ValueError):
    """An hf_ddpm module cannot be inlined into the self-contained remote code."""


@dataclass(frozen=True)
class _ParsedModule:
    """One module's source, the line ranges (1-based, inclusive) of its package imports, and the modules they
    import from."""

    name: str
    source: str
    tree: ast.Module
    removed_lines: tuple[tuple[int, int], ...]
    dependencies: tuple[str, ...]


def _where(module: str, node: ast.AST) -> str:
    return f"{module.replace('.', '/')}.py line {node.lineno}"


def _package_source(node: ast.ImportFrom, module: str, package: str) -> str | None:
    """The module ``node`` imports from if it is inside ``package`` (resolving relative imports), else None."""
    if node.level:
        parent = module.rpartition(".")[0]
        return importlib.util.resolve_name("." * node.level + (node.module or ""), parent)
    if node.module is not None and (node.module == package or node.module.startswith(package + ".")):
        return node.module
    return None


def _checked_dependency(node: ast.ImportFrom, module: str, source: str) -> str:
    """``source`` if ``node`` imports plain names from a module (not a package, not renamed), else raise."""
    if importlib.util.find_spec(source).submodule_search_locations is not None:
        raise RemoteCodeError(
            f"{_where(module, node)} imports from the package {source}; import the names from the module that "
            "defines them, so the remote code can inline it."
        )
    renamed = [alias.name for alias in node.names if alias.name == "*" or alias.asname not in (None, alias.name)]
    if renamed:
        raise RemoteCodeError(
            f"{_where(module, node)} imports {renamed} from {source} with * or a new name; import them by name."
        )
    return source


def _parse(module: str, package: str) -> _ParsedModule:
    """Parse an installed module and find its imports from ``package``; raise on any the bundle cannot inline."""
    spec = importlib.util.find_spec(module)
    source = Path(spec.origin).read_text(encoding="utf-8")
    tree = ast.parse(source)
    removed, dependencies = [], []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            removed.append((node.lineno, node.end_lineno))
        elif isinstance(node, ast.ImportFrom) and (target := _package_source(node, module, package)) is not None:
            dependencies.append(_checked_dependency(node, module, target))
            removed.append((node.lineno, node.end_lineno))
    top_level = set(map(id, tree.body))
    for node in ast.walk(tree):
        nested = id(node) not in top_level
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == package for a in node.names):
            raise RemoteCodeError(
                f"{_where(module, node)} imports {package} with 'import'; use 'from .module import name' at module "
                "level."
            )
        if nested and isinstance(node, ast.ImportFrom) and _package_source(node, module, package) is not None:
            raise RemoteCodeError(
                f"{_where(module, node)} imports from {package} inside a block; move the import to module level."
            )
    return _ParsedModule(module, source, tree, tuple(removed), tuple(dict.fromkeys(dependencies)))


def _in_dependency_order(roots: Iterable[str], package: str) -> list[_ParsedModule]:
    """Every module reachable from ``roots`` through package imports, each after the modules it imports."""
    ordered: dict[str, _ParsedModule] = {}
    visiting: list[str] = []

    def visit(module: str) -> None:
        if module in ordered:
            return
        if module in visiting:
            raise RemoteCodeError(
                f"import cycle between {' -> '.join(visiting[visiting.index(module) :] + [module])}."
            )
        visiting.append(module)
        parsed = _parse(module, package)
        for dependency in parsed.dependencies:
            visit(dependency)
        visiting.pop()
        ordered[module] = parsed

    for root in roots:
        visit(root)
    return list(ordered.values())


def _bindings(parsed: _ParsedModule) -> dict[str, str]:
    """Top-level names a module binds -> the statement that binds them (``ast.dump``), imports from the package
    (removed from the bundle) excepted."""
    names: dict[str, str] = {}
    for node in parsed.tree.body:
        if any(node.lineno == start for start, _ in parsed.removed_lines):
            continue
        statement = ast.dump(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = statement
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update({n.id: statement for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)})
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None)
            names.update({(a.asname or a.name).split(".")[0]: f"{module}:{a.name}" for a in node.names})
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _renamed(parsed: _ParsedModule, names: set[str]) -> _ParsedModule:
    """``parsed`` with every use of its top-level private ``names`` renamed ``_<module path>__<name>`` (names read
    as tokens: attributes ``x._name``, strings and comments are left alone; a keyword argument or class attribute
    spelt like such a name would be renamed too, so modules keep those names apart), so that two modules' private
    helpers of one name can share the bundle's one namespace."""
    prefix = "_" + parsed.name.replace(".", "_") + "_"
    lines = parsed.source.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(io.StringIO(parsed.source).readline))
    edits = [
        token.start
        for previous, token in zip([None, *tokens], tokens)
        if token.type == tokenize.NAME
        and token.string in names
        and not (previous is not None and previous.type == tokenize.OP and previous.string == ".")
    ]
    for row, column in reversed(edits):
        line = lines[row - 1]
        lines[row - 1] = line[:column] + prefix + line[column:]
    source = "".join(lines)
    return _ParsedModule(parsed.name, source, ast.parse(source), parsed.removed_lines, parsed.dependencies)


def _with_private_names_apart(modules: list[_ParsedModule], package: str) -> list[_ParsedModule]:
    """The modules with the private top-level names that two of them bind differently renamed in each module
    (:func:`_renamed`), except where another bundled module imports the name (it must keep it)."""
    bindings = [_bindings(parsed) for parsed in modules]
    imported = {
        (source, alias.name)
        for parsed in modules
        for node in parsed.tree.body
        if isinstance(node, ast.ImportFrom) and (source := _package_source(node, parsed.name, package)) is not None
        for alias in node.names
    }
    statements: dict[str, set[str]] = {}
    for names in bindings:
        for name, statement in names.items():
            statements.setdefault(name, set()).add(statement)
    clashing = {name for name, found in statements.items() if len(found) > 1 and _is_private(name)}
    result = []
    for parsed, names in zip(modules, bindings):
        rename = {name for name in clashing & set(names) if (parsed.name, name) not in imported}
        result.append(_renamed(parsed, rename) if rename else parsed)
    return result


def _check_no_collisions(modules: list[_ParsedModule]) -> None:
    """Raise if two modules bind one top-level name differently (in one file, the later would replace the earlier)."""
    seen: dict[str, tuple[str, str]] = {}
    for parsed in modules:
        for name, statement in _bindings(parsed).items():
            first_module, first_statement = seen.setdefault(name, (parsed.name, statement))
            if first_statement != statement:
                raise RemoteCodeError(
                    f"{name!r} is bound differently in {first_module} and {parsed.name}; rename one so the modules "
                    "can share the one file of the remote code (private names are kept apart by the bundler)."
                )


def _check_one_pipeline(modules: list[_ParsedModule]) -> None:
    """Raise if the modules define more than one ``DiffusionPipeline`` subclass: diffusers' ``custom_pipeline``
    loader takes the file's only pipeline class and refuses a file with several."""
    pipelines = [
        f"{parsed.name}.{name}"
        for parsed in modules
        for name, value in vars(importlib.import_module(parsed.name)).items()
        if isinstance(value, type) and issubclass(value, DiffusionPipeline) and value.__module__ == parsed.name
    ]
    if len(pipelines) > 1:
        raise RemoteCodeError(
            f"the remote code would define the pipelines {', '.join(pipelines)}, and diffusers loads a custom "
            "pipeline only from a file with one; import what the pipeline needs from modules without a pipeline."
        )


def _stripped_source(parsed: _ParsedModule) -> str:
    lines = parsed.source.splitlines()
    for start, end in sorted(parsed.removed_lines, reverse=True):
        del lines[start - 1 : end]
    return "\n".join(lines).strip("\n") + "\n"


def bundle_source(modules: Iterable[str], package: str = PACKAGE) -> str:
    """One self-contained module with the code of ``modules`` (installed modules of ``package``) and of every
    ``package`` module they import, in dependency order, without imports between them.

    diffusers executes a remote-code file again, in the same module, for every component it loads from it, which
    would give every class a second definition and break the ``isinstance`` checks of objects built from the first
    (a UNet that no longer recognises its own blocks). The file therefore ends by restoring the names of an earlier
    execution of the same file (same content hash), so each name keeps one definition per process.
    """
    ordered = _with_private_names_apart(_in_dependency_order(modules, package), package)
    _check_no_collisions(ordered)
    _check_one_pipeline(ordered)
    body = "".join(
        f"\n\n# {'=' * 30} {m.name.replace('.', '/')}.py {'=' * 30}\n{_stripped_source(m)}" for m in ordered
    )
    content_id = hashlib.sha256(body.encode()).hexdigest()[:16]
    return (
        f"# Generated by {PACKAGE} {importlib.metadata.version(PACKAGE)} from its modules\n"
        f"# {', '.join(m.name for m in ordered)}.\n"
        f"# Do not edit: every push writes it again. It lets stock diffusers load this repo without {PACKAGE}:\n"
        "#     DiffusionPipeline.from_pretrained(\n"
        f'#         repo_id, trust_remote_code=True, revision="main")\n'
        f"# With {PACKAGE} installed, its pipeline's from_pretrained uses the installed code and never runs this "
        "file.\n"
        f"{FUTURE_IMPORT}\n\n"
        "# diffusers runs this file again in the same module for each component it loads: see the end of the file.\n"
        f'_{ID_NAME}_EARLIER = dict(globals()) if globals().get("{ID_NAME}") == "{content_id}" else None\n'
        f"{body}\n\n"
        f"# {'=' * 20} end: keep the definitions of an earlier run of this same file {'=' * 20}\n"
        f'{ID_NAME} = "{content_id}"\n'
        f"if _{ID_NAME}_EARLIER is not None:\n"
        f"    globals().update(_{ID_NAME}_EARLIER)\n"
    )


def remote_code_files(pipeline: Any) -> dict[str, str]:
    """The remote code of an hf_ddpm pipeline: repo path -> source. The same bundle (the pipeline class, its
    hf_ddpm components' classes and what they import) goes to the repo root, where ``custom_pipeline`` finds it,
    and into the folder of each hf_ddpm component, where diffusers looks for the ``hf_ddpm`` library's code."""
    if library_of(pipeline) is None:
        raise RemoteCodeError(
            f"{type(pipeline).__name__} is not a public {PACKAGE} pipeline class: no remote code for it."
        )
    components = {name: m for name, m in pipeline.components.items() if m is not None and library_of(m) is not None}
    classes = [type(pipeline), *(type(module) for module in components.values())]
    source = bundle_source(dict.fromkeys(cls.__module__ for cls in classes))
    return {REMOTE_CODE_FILENAME: source, **{f"{name}/{REMOTE_CODE_FILENAME}": source for name in components}}
