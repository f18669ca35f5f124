"""How hf_ddpm pipelines record their components in ``model_index.json``, load them, and push by repo id.

Components are recorded as ``["hf_ddpm", ClassName]`` (:mod:`hf_ddpm.hub.naming`). diffusers then resolves the
class with ``getattr(hf_ddpm, name)`` and decides how to load it by checking it against the base classes it finds
*by name in the same module* (``getattr(hf_ddpm, "ModelMixin")``, ``"SchedulerMixin"``, ...). That is why
``hf_ddpm/__init__.py`` re-exports :data:`LOADING_BASE_CLASSES`; without them even a local ``from_pretrained``
fails with "... does not seem to have any of the loading methods defined".

This module is part of the self-contained remote code a Hub repo ships (:mod:`hf_ddpm.hub.remote_code`), so it
works in both places. Writing repos (:mod:`hf_ddpm.hub.push`) is not: :meth:`HFDDPMRegistrationMixin.push_to_hub`
imports it when called, and says what to install when it is missing.
"""

from __future__ import annotations

import errno
import importlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .loading import load_package_components, pipeline_class_name, pipeline_folder, read_model_index
from .naming import PACKAGE, library_of, package_namespace

#: The diffusers base classes the component loader looks up in the ``hf_ddpm`` namespace.
LOADING_BASE_CLASSES = {
    "ModelMixin": ModelMixin,
    "SchedulerMixin": SchedulerMixin,
    "ConfigMixin": ConfigMixin,
    "DiffusionPipeline": DiffusionPipeline,
}

#: ``from_pretrained`` options that say where the files come from (see :mod:`hf_ddpm.hub.loading`).
HUB_OPTIONS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download")


def make_readable(folder: Path, files: Iterable[str]) -> None:
    """Give the ``files`` (relative to ``folder``) the mode a plain write would (0644 under the usual umask 022):
    safetensors writes its weight files 0600 (diffusers' save_pretrained and accelerate's save_state keep that
    mode), so another user could not load a shared model folder or checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    for name in files:
        path = Path(folder) / name
        mode = path.stat().st_mode & 0o777
        wanted = mode | (0o666 & ~umask)
        if wanted != mode:
            path.chmod(wanted)


def write_failure(error: BaseException, path: str | Path) -> OSError | None:
    """``error``, raised while writing ``path`` (a weights file or a folder of them), as an ``OSError`` naming
    ``path`` (unless it names its own file) and saying in words what failed, without the writers' internals:
    safetensors reports a full disk as ``SafetensorError('... I/O error: No space left on device (os error 28)')``,
    torch as ``RuntimeError('[enforce fail at inline_container.cc:...] unexpected pos ...')``. None when ``error``
    is not a failed write."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), error.filename or str(path))
    text = str(error)
    code = re.search(r"os error (\d+)", text)
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))
    if "PytorchStreamWriter" in text or "unexpected pos" in text or "file write failed" in text:
        return OSError(errno.EIO, "a file write failed part-way, most likely a full disk", str(path))
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
        saved_class = pipeline_class_name(read_model_index(folder))
        if saved_class and saved_class not in {klass.__name__ for klass in cls.__mro__}:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {saved_class}, not a {cls.__name__}: load it with "
                f"{saved_class}.from_pretrained (from hf_ddpm import {saved_class})."
            )
        components = load_package_components(folder, package_namespace(HFDDPMRegistrationMixin), PACKAGE, kwargs)
        pipeline = super().from_pretrained(folder, **components, **kwargs)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))  # the repo id, as diffusers does
        return pipeline

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, with the weight files readable by others as any written file is (0644
        under umask 022; :func:`make_readable`) and a failed write as an ``OSError`` naming the folder
        (:func:`write_failure`)."""
        try:
            super().save_pretrained(save_directory, **kwargs)
        except Exception as error:
            failure = write_failure(error, save_directory)
            if failure is None:
                raise
            raise failure from error
        folder = Path(save_directory)
        make_readable(folder, [p.relative_to(folder) for p in folder.rglob("*.safetensors")])

    @classmethod
    def load_config(cls, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``load_config``, with ``_class_name`` read as the class name alone: a repo records it as
        ``["hf_ddpm", ClassName]`` for stock diffusers (see :func:`hf_ddpm.hub.loading.pipeline_class_name`), which
        would make diffusers run the repo's remote code instead of this installed class."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if "_class_name" in config:
            config["_class_name"] = pipeline_class_name(config)
        return loaded

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Push this pipeline as a complete Hub repo: safetensors weights, model card, the self-contained remote
        code and, if given, the sample grid and training arguments. See :func:`hf_ddpm.hub.push.push_pipeline_to_hub`
        for the arguments; without ``card`` a card describing the pipeline alone is written."""
        try:  # imported at call time: the remote code, which holds this module, cannot write repos
            push = importlib.import_module(f"{PACKAGE}.hub.push")
        except ModuleNotFoundError as error:
            if error.name != PACKAGE:
                raise
            raise ModuleNotFoundError(
                f"push_to_hub needs the {PACKAGE} package (pip install {PACKAGE}); this pipeline was loaded from a "
                "repo's remote code, which can load and sample but not write repos."
            ) from error
        return push.push_pipeline_to_hub(self, repo_id, **kwargs)
