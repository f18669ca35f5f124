"""hf_ddpm: variational autoencoders and denoising diffusion models, derived from the ELBO, as diffusers components.

The layers, in the order of the derivation (see ARCHITECTURE.md): ``distributions`` -> ``vae`` -> ``vdm`` ->
``models`` -> ``evaluation`` -> ``hub`` -> ``pipelines`` -> ``objectives`` / ``training_utils`` -> ``cli``.
"""

import importlib
import warnings

from .ddpm.chain import DiffusionChain
from .ddpm.scheduler import HFDDPMScheduler, HFDDPMSchedulerOutput
from .evaluation import BoundOptions, BoundResult, evaluate_bound
from .hub.card import NLLResult, TrainingReport, render_model_card
from .hub.push import push_pipeline_to_hub, save_pipeline_repo
from .hub.registration import LOADING_BASE_CLASSES
from .models.unet import DenoisingUNet, DenoisingUNetOutput, default_unet_layout
from .pipelines.ddpm import HFDDPMPipeline
from .pipelines.vae import VAEPipeline
from .pipelines.vdm import VDMPipeline
from .vae.model import GaussianVAE
from .vdm.noise_schedule import NoiseSchedule
from .vdm.scheduler import VDMContinuousScheduler

# diffusers' component loader finds these base classes by name in the library named in model_index.json
# (see hf_ddpm/hub/registration.py); they are re-exported for it, not as hf_ddpm API.
ModelMixin = LOADING_BASE_CLASSES["ModelMixin"]
SchedulerMixin = LOADING_BASE_CLASSES["SchedulerMixin"]
ConfigMixin = LOADING_BASE_CLASSES["ConfigMixin"]
DiffusionPipeline = LOADING_BASE_CLASSES["DiffusionPipeline"]

__version__ = "0.2.0"

#: Public names renamed in 0.2.0 (old name -> new name); the old ones still resolve, with a FutureWarning once, until
#: 0.3.0. ``model_index.json`` files that name them (anything saved by 0.1.x) keep loading through the same lookup.
RENAMED_IN_0_2 = {"VDMScheduler": "HFDDPMScheduler", "VDMSchedulerOutput": "HFDDPMSchedulerOutput"}
#: Names removed from the package's top level in 0.2.0 (name -> the module that still defines it): the pipelines'
#: ``elbo`` returns :class:`BoundResult` for every model kind, and these are the outputs of the model-level
#: equations only. ``hf_ddpm.<name>`` still resolves, with a FutureWarning once, until 0.3.0.
REMOVED_IN_0_2 = {
    "ELBOOutput": "hf_ddpm.ddpm.elbo",
    "VAEELBOOutput": "hf_ddpm.vae.model",
    "IWAEOutput": "hf_ddpm.vae.model",
}
_warned: set[str] = set()


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        warnings.warn(message, FutureWarning, stacklevel=3)


def __getattr__(name: str):
    """The renamed classes under their 0.1 names and the removed ones at the top level (PEP 562), with a
    FutureWarning the first time each is used."""
    if name in RENAMED_IN_0_2:
        new_name = RENAMED_IN_0_2[name]
        _warn_once(
            name,
            f"hf_ddpm.{name} is now hf_ddpm.{new_name} (the discrete-time DDPM's scheduler; hf_ddpm 0.2.0): the old "
            "name goes in 0.3.0. Saved models that name it keep loading and are saved under the new name.",
        )
        return globals()[new_name]
    if name in REMOVED_IN_0_2:
        module = REMOVED_IN_0_2[name]
        _warn_once(
            name,
            f"hf_ddpm.{name} leaves the top level in 0.3.0: every pipeline's elbo returns hf_ddpm.BoundResult since "
            f"0.2.0; import {name} (a model-level equation's output) from {module}.",
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'hf_ddpm' has no attribute {name!r}")


__all__ = [
    "BoundOptions",
    "BoundResult",
    "DenoisingUNet",
    "DenoisingUNetOutput",
    "DiffusionChain",
    "GaussianVAE",
    "HFDDPMPipeline",
    "NLLResult",
    "NoiseSchedule",
    "TrainingReport",
    "VAEPipeline",
    "VDMContinuousScheduler",
    "VDMPipeline",
    "HFDDPMScheduler",
    "HFDDPMSchedulerOutput",
    "default_unet_layout",
    "evaluate_bound",
    "push_pipeline_to_hub",
    "render_model_card",
    "save_pipeline_repo",
]
