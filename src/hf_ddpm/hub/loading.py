"""Where an hf_ddpm pipeline's files come from, and how its hf_ddpm components are loaded from them.

A pipeline is a folder written by ``save_pretrained``, or a Hub repo. From the Hub only ``model_index.json`` and
each component's ``*.json`` and ``*.safetensors`` files are downloaded into the Hugging Face cache, all at one
commit (the revision is resolved once, so a push during the download cannot mix two versions). The repo's
remote code (``hf_ddpm.py``, ``unet/hf_ddpm.py``, ...) is never fetched: the components recorded as
``["hf_ddpm", ClassName]`` are loaded with the installed classes (:func:`load_package_components`), so diffusers
never reaches the step where it would run a component's ``.py`` file from the folder. Pickle weights are
refused, in a local folder and in a Hub repo (before anything else is downloaded).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin
from huggingface_hub import get_cached_repo_tree, resolve_revision, snapshot_download
from huggingface_hub.errors import CachedRepoTreeNotFoundError

MODEL_INDEX = "model_index.json"
#: Weight formats that are Python pickles (loading one can execute code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: ``from_pretrained`` options of a pipeline that also apply to its models (a dict value maps component -> value).
MODEL_OPTIONS = ("dtype", "torch_dtype", "variant")


def component_entries(index: dict[str, Any]) -> dict[str, tuple[str | None, str | None]]:
    """The components a ``model_index.json`` records: name -> (library, class name); an optional component saved
    absent (``[null, null]``, such as a pipeline's missing ``guide_unet``) is none."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value != [None, None]
    }


def read_model_index(folder: Path) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a pipeline folder."""
    path = folder / MODEL_INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MODEL_INDEX}, so it is not a pipeline saved with save_pretrained; if the pipeline is "
            "inside it, pass subfolder=..."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def pipeline_class_name(index: dict[str, Any]) -> str | None:
    """The pipeline class a ``model_index.json`` names: ``_class_name`` is ``"HFDDPMPipeline"`` in a folder written by
    ``save_pretrained``, and ``["hf_ddpm", "HFDDPMPipeline"]`` (the remote-code file and the class in it, which lets
    stock diffusers load the repo with no argument but ``trust_remote_code=True``) in a repo written by
    :func:`hf_ddpm.hub.push.save_pipeline_repo`."""
    name = index.get("_class_name")
    return name[1] if isinstance(name, (list, tuple)) and len(name) == 2 else name


def refuse_pickle_weights(files: Iterable[str], components: Iterable[str], source: str) -> None:
    """Raise ``ValueError`` if any of ``files`` (paths relative to the pipeline folder) is a pickle in a component
    folder."""
    folders = tuple(f"{name}/" for name in components)
    pickles = sorted(f for f in files if f.startswith(folders) and f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{source} holds pickle weights ({', '.join(pickles)}). hf_ddpm loads safetensors only, because loading "
            "a pickle can run arbitrary code. Load that pipeline once where you trust it, save it again with "
            "save_pretrained(...) (safetensors is the default) and push the result."
        )


def count_nonfinite(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(how many elements are NaN or +-inf, how many elements there are) in all of ``tensors`` together."""
    bad = total = 0
    for tensor in tensors:
        if tensor.is_floating_point():
            bad += int((~torch.isfinite(tensor)).sum())
        total += tensor.numel()
    return bad, total


def refuse_nonfinite_weights(model: torch.nn.Module, source: str) -> None:
    """Raise ``ValueError`` (one line) if any weight or buffer of ``model`` (loaded from ``source``) is NaN or
    +-inf: such a model samples black images and reports a NaN bound, so it is refused before any use."""
    bad, total = count_nonfinite(model.state_dict().values())
    if bad:
        raise ValueError(
            f"{source}: {bad:,} of its {total:,} weights are NaN or inf (a training run that diverged); load a "
            "checkpoint saved before that, or retrain with a lower learning rate."
        )


def _component_files(folder: Path, components: Iterable[str]) -> list[str]:
    """The files in the component folders of a pipeline folder, relative to it."""
    paths = (path for name in components for path in (folder / name).rglob("*"))
    return [path.relative_to(folder).as_posix() for path in paths if path.is_file()]


def _cached_repo_files(repo_id: str, commit: str, cache_dir: str | Path | None, prefix: str) -> list[str]:
    """The repo's files under ``prefix`` at ``commit``, relative to it, from the listing that ``snapshot_download``
    cached; empty when no listing is cached (a cache filled by an older huggingface_hub, used offline)."""
    try:
        tree = get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return []
    return [entry.path[len(prefix) :] for entry in tree if entry.path.startswith(prefix)]


def download_pipeline(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """Download a pipeline's ``model_index.json`` and its components' configs and safetensors weights from the Hub
    into the cache (or find them there offline) and return the snapshot folder of the pipeline."""
    commit = resolve_revision(
        repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""

    def download(patterns: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id,
                revision=commit,
                allow_patterns=patterns,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                force_download=force_download,
            )
        )

    folder = download([prefix + MODEL_INDEX]) / prefix
    components = component_entries(read_model_index(folder))
    listed = _cached_repo_files(repo_id, commit, cache_dir, prefix)
    refuse_pickle_weights(listed, components, f"{repo_id} (commit {commit.resolved})")
    download([f"{prefix}{name}/*{suffix}" for name in components for suffix in (".json", ".safetensors")])
    return folder


def looks_local(name_or_path: str | Path) -> bool:
    """True when ``name_or_path`` cannot be a Hub repo id: it exists, starts with ``.``, ``/`` or ``~``, or has
    more than one slash."""
    text = str(name_or_path)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def pipeline_folder(name_or_path: str | Path, *, subfolder: str | None = None, **hub_options: Any) -> Path:
    """The local folder of a pipeline: ``name_or_path`` (or its ``subfolder``) if it is a directory, else the Hub
    repo ``name_or_path`` downloaded by :func:`download_pipeline` with ``hub_options``. Refuses pickle weights."""
    local = Path(name_or_path)
    if local.is_dir():
        folder = local / subfolder if subfolder else local
    elif looks_local(name_or_path):
        what = "is a file, not a pipeline folder" if local.exists() else "no such folder"
        raise FileNotFoundError(
            f"{name_or_path}: {what} (a local path; a Hub repo id has the form ORG/NAME). Give the folder that "
            "save_pretrained or training/train.py wrote, with its model_index.json."
        )
    else:
        folder = download_pipeline(str(name_or_path), subfolder=subfolder, **hub_options)
    components = component_entries(read_model_index(folder))
    refuse_pickle_weights(_component_files(folder, components), components, str(folder))
    return folder


def _model_options(kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """The options of :data:`MODEL_OPTIONS` in a pipeline's ``kwargs``, for its component ``name`` (diffusers'
    convention: a dict value maps component names, or ``"default"``, to values)."""
    return {
        key: kwargs[key].get(name, kwargs[key].get("default")) if isinstance(kwargs[key], dict) else kwargs[key]
        for key in MODEL_OPTIONS
        if key in kwargs
    }


def load_package_components(
    folder: Path, namespace: ModuleType, package: str, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Load every component that ``folder``'s ``model_index.json`` records as ``[package, ClassName]`` with the
    class of that name in ``namespace``, except those passed in ``kwargs``; models get the options of
    :data:`MODEL_OPTIONS` from ``kwargs`` and load safetensors only. Returns name -> component."""
    components = {}
    for name, (library, class_name) in component_entries(read_model_index(folder)).items():
        if library != package or name in kwargs:
            continue
        component_class = getattr(namespace, class_name, None)
        if component_class is None:
            raise ValueError(
                f"{folder / MODEL_INDEX} records the {name!r} component as {package}.{class_name}, which "
                f"{namespace.__name__} does not define; upgrade {package} (pip install -U {package})."
            )
        is_model = issubclass(component_class, ModelMixin)
        options = {**_model_options(kwargs, name), "use_safetensors": True} if is_model else {}
        components[name] = component_class.from_pretrained(folder, subfolder=name, **options)
        if is_model:
            refuse_nonfinite_weights(components[name], str(folder / name))
    return components
