"""hf_ddpm: variational autoencoders and denoising diffusion models, derived from the ELBO, as diffusers components.

The layers, in the order of the derivation (see ARCHITECTURE.md): ``distributions`` -> ``vae`` -> ``vdm`` ->
``models`` -> ``evaluation`` -> ``hub`` -> ``pipelines`` -> ``objectives`` / ``training_utils`` -> ``cli``.
"""

from .evaluation import BoundOptions, BoundResult, evaluate_bound
from .hub.card import NLLResult, TrainingReport, render_model_card
from .hub.push import push_pipeline_to_hub, save_pipeline_repo
from .hub.registration import LOADING_BASE_CLASSES
from .models.unet import DenoisingUNet, DenoisingUNetOutput, default_unet_layout
from .pipelines.ddpm import HFDDPMPipeline
from .pipelines.vae import VAEPipeline
from .pipelines.vdm import VDMPipeline
from .vae.model import GaussianVAE, IWAEOutput, VAEELBOOutput
from .vdm.chain import DiffusionChain
from .vdm.continuous_scheduler import VDMContinuousScheduler
from .vdm.elbo import ELBOOutput
from .vdm.noise_schedule import NoiseSchedule
from .vdm.scheduler import VDMScheduler, VDMSchedulerOutput

# diffusers' component loader finds these base classes by name in the library named in model_index.json
# (see hf_ddpm/hub/registration.py); they are re-exported for it, not as hf_ddpm API.
ModelMixin = LOADING_BASE_CLASSES["ModelMixin"]
SchedulerMixin = LOADING_BASE_CLASSES["SchedulerMixin"]
ConfigMixin = LOADING_BASE_CLASSES["ConfigMixin"]
DiffusionPipeline = LOADING_BASE_CLASSES["DiffusionPipeline"]

__version__ = "0.1.0"

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
    "VDMScheduler",
    "VDMSchedulerOutput",
    "default_unet_layout",
    "evaluate_bound",
    "push_pipeline_to_hub",
    "render_model_card",
    "save_pipeline_repo",
]
