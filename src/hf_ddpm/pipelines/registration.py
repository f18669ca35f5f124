"""How hf_ddpm pipelines record and find their components in ``model_index.json``, and load and push by repo id.

diffusers records a component from outside its own libraries under its full module path
(``["hf_ddpm.models.unet", "DenoisingUNet"]``), which breaks every saved model when a module moves. hf_ddpm
records its public classes under the package name instead (``["hf_ddpm", "DenoisingUNet"]``). diffusers then
resolves the class with ``getattr(hf_ddpm, name)`` and decides how to load it by checking it against the base
classes it finds *by name in the same module* (``getattr(hf_ddpm, "ModelMixin")``, ``"SchedulerMixin"``, ...).
That is why ``hf_ddpm/__init__.py`` re-exports :data:`LOADING_BASE_CLASSES`; without them even a local
``from_pretrained`` fails with "... does not seem to have any of the loading methods defined".

A Hub repo also ships a self-contained copy of this code as ``hf_ddpm.py`` (see :mod:`hf_ddpm.remote_code`), which
stock diffusers runs with ``trust_remote_code=True``. Everything here therefore works in both places: "the hf_ddpm
namespace" of a class is the installed package, or that single module when the class was loaded from it.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .loading import load_package_components, pipeline_folder

#: The diffusers base classes the component loader looks up in the ``hf_ddpm`` namespace.
LOADING_BASE_CLASSES = {
    "ModelMixin": ModelMixin,
    "SchedulerMixin": SchedulerMixin,
    "ConfigMixin": ConfigMixin,
    "DiffusionPipeline": DiffusionPipeline,
}

PACKAGE = "hf_ddpm"
#: ``from_pretrained`` options that say where the files come from (see :mod:`hf_ddpm.pipelines.loading`).
HUB_OPTIONS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download")


def package_namespace(cls: type) -> ModuleType | None:
    """The module that holds hf_ddpm's public classes for ``cls``: the installed ``hf_ddpm`` package for its own
    classes, the module itself for a class from the remote-code copy ``hf_ddpm.py`` that stock diffusers imports
    from a Hub repo, None for any other class."""
    parts = cls.__module__.split(".")
    if parts[0] == PACKAGE:
        return sys.modules[PACKAGE]
    if parts[-1] == PACKAGE:
        return sys.modules.get(cls.__module__)
    return None


def library_of(module: Any) -> tuple[str, str] | None:
    """``("hf_ddpm", ClassName)`` for an instance of a public hf_ddpm class, None for anything else."""
    cls = module if isinstance(module, type) else type(module)
    namespace = package_namespace(cls)
    if namespace is not None and getattr(namespace, cls.__name__, None) is cls:
        return PACKAGE, cls.__name__
    return None


class HFDDPMRegistrationMixin:
    """Records hf_ddpm components in ``model_index.json`` as ``["hf_ddpm", ClassName]``; loads pipelines by Hub
    repo id with the installed hf_ddpm classes (safetensors only, no remote code) and pushes complete repos."""

    def register_modules(self, **kwargs: Any) -> None:
        super().register_modules(**kwargs)
        self._record_hf_ddpm_components(kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in getattr(self, "_internal_dict", {}) and value is not None:
            self._record_hf_ddpm_components({name: value})

    def _record_hf_ddpm_components(self, components: dict[str, Any]) -> None:
        for name, module in components.items():
            entry = library_of(module) if module is not None else None
            if entry is not None:
                self.register_to_config(**{name: entry})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> Any:
        r"""Load from a local folder or a Hub repo id, with this package's classes for the hf_ddpm components.

        Downloads only ``model_index.json`` and the components' configs and ``.safetensors`` weights (never the
        repo's ``*.py``), pinned to one commit, into the Hugging Face cache; afterwards it works offline
        (``HF_HUB_OFFLINE=1``). A repo or folder with pickle weights (``*.bin``, ``*.pt``, ...) is refused.

        Args:
            pretrained_model_name_or_path: ``"org/name"`` on the Hub, or a folder written by ``save_pretrained``.
            revision (`str`, *optional*): branch, tag or commit sha. Pass it explicitly (``revision="main"``)
                when the Hub endpoint is a mirror that only resolves explicit revisions.
            subfolder (`str`, *optional*): a pipeline saved inside the repo, e.g. ``"checkpoints/step-500"``.
            cache_dir, token, local_files_only, force_download: as in ``huggingface_hub.snapshot_download``.
            **kwargs: everything else goes to ``DiffusionPipeline.from_pretrained`` (components to use instead of
                the saved ones, ``dtype``, ...); ``dtype``/``torch_dtype`` and ``variant`` also reach the
                hf_ddpm models.
        """
        hub_options = {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}
        folder = pipeline_folder(pretrained_model_name_or_path, **hub_options)
        components = load_package_components(folder, package_namespace(HFDDPMRegistrationMixin), PACKAGE, kwargs)
        pipeline = super().from_pretrained(folder, **components, **kwargs)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))  # the repo id, as diffusers does
        return pipeline

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Push this pipeline as a complete Hub repo: safetensors weights, model card, the self-contained remote
        code and, if given, the sample grid and training arguments. See :func:`hf_ddpm.hub.push_pipeline_to_hub`
        for the arguments; without ``card`` a card describing the pipeline alone is written."""
        try:  # imported at call time: hf_ddpm.hub builds on this module, and is not part of the remote code
            hub = importlib.import_module(f"{PACKAGE}.hub")
        except ModuleNotFoundError as error:
            if error.name != PACKAGE:
                raise
            raise ModuleNotFoundError(
                f"push_to_hub needs the {PACKAGE} package (pip install {PACKAGE}); this pipeline was loaded from a "
                "repo's remote code, which can load and sample but not write repos."
            ) from error
        return hub.push_pipeline_to_hub(self, repo_id, **kwargs)
