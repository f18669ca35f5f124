"""hf_ddpm: variational autoencoders and denoising diffusion models, derived from the ELBO, as diffusers components.

The layers, in the order of the derivation (see ARCHITECTURE.md): ``distributions`` -> ``vae`` -> ``vdm`` ->
``models`` -> ``evaluation`` -> ``hub`` -> ``pipelines`` -> ``objectives`` / ``training_utils`` -> ``cli``.
"""

import warnings

from .ddpm.chain import DiffusionChain
from .ddpm.elbo import ELBOOutput
from .ddpm.scheduler import HFDDPMScheduler, HFDDPMSchedulerOutput
from .evaluation import BoundOptions, BoundResult, evaluate_bound
from .hub.card import NLLResult, TrainingReport, render_model_card
from .hub.push import push_pipeline_to_hub, save_pipeline_repo
from .hub.registration import LOADING_BASE_CLASSES
from .models.unet import DenoisingUNet, DenoisingUNetOutput, default_unet_layout
from .pipelines.ddpm import HFDDPMPipeline
from .pipelines.vae import VAEPipeline
from .pipelines.vdm import VDMPipeline
from .vae.model import GaussianVAE, IWAEOutput, VAEELBOOutput
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
_warned: set[str] = set()


def __getattr__(name: str):
    """The renamed classes under their 0.1 names (PEP 562), with a FutureWarning the first time each is used."""
    if name not in RENAMED_IN_0_2:
        raise AttributeError(f"module 'hf_ddpm' has no attribute {name!r}")
    new_name = RENAMED_IN_0_2[name]
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"hf_ddpm.{name} is now hf_ddpm.{new_name} (the discrete-time DDPM's scheduler; hf_ddpm 0.2.0): the old "
            "name goes in 0.3.0. Saved models that name it keep loading and are saved under the new name.",
            FutureWarning,
            stacklevel=2,
        )
    return globals()[new_name]


__all__ = [
    "BoundOptions",
    "BoundResult",
    "DenoisingUNet",
    "DenoisingUNetOutput",
    "DiffusionChain",
    "ELBOOutput",
    "GaussianVAE",
    "HFDDPMPipeline",
    "IWAEOutput",
    "NLLResult",
    "NoiseSchedule",
    "TrainingReport",
    "VAEELBOOutput",
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
