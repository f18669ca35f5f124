"""How hf_ddpm pipelines record and find their components in ``model_index.json``.

diffusers records a component from outside its own libraries under its full module path
(``["hf_ddpm.models.unet", "DenoisingUNet"]``), which breaks every saved model when a module moves. hf_ddpm
records its public classes under the package name instead (``["hf_ddpm", "DenoisingUNet"]``). diffusers then
resolves the class with ``getattr(hf_ddpm, name)`` and decides how to load it by checking it against the base
classes it finds *by name in the same module* (``getattr(hf_ddpm, "ModelMixin")``, ``"SchedulerMixin"``, ...).
That is why ``hf_ddpm/__init__.py`` re-exports :data:`LOADING_BASE_CLASSES`; without them even a local
``from_pretrained`` fails with "... does not seem to have any of the loading methods defined".
"""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

#: The diffusers base classes the component loader looks up in the ``hf_ddpm`` namespace.
LOADING_BASE_CLASSES = {
    "ModelMixin": ModelMixin,
    "SchedulerMixin": SchedulerMixin,
    "ConfigMixin": ConfigMixin,
    "DiffusionPipeline": DiffusionPipeline,
}

PACKAGE = "hf_ddpm"


def library_of(module: Any) -> tuple[str, str] | None:
    """``("hf_ddpm", ClassName)`` for an instance of a public hf_ddpm class, None for anything else."""
    import hf_ddpm

    cls = module if isinstance(module, type) else type(module)
    if cls.__module__.split(".")[0] == PACKAGE and getattr(hf_ddpm, cls.__name__, None) is cls:
        return PACKAGE, cls.__name__
    return None


class HFDDPMRegistrationMixin:
    """Records hf_ddpm components in ``model_index.json`` as ``["hf_ddpm", ClassName]``."""

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
