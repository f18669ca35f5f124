"""hf_ddpm: variational autoencoders and denoising diffusion models, derived from the ELBO, as diffusers components."""

from . import losses
from .hub import NLLResult, TrainingReport, push_pipeline_to_hub, render_model_card, save_pipeline_repo
from .models.unet import DenoisingUNet, DenoisingUNetOutput
from .models.vae import GaussianVAE, IWAEOutput, VAEELBOOutput
from .pipelines.ddpm import ELBOOutput, HFDDPMPipeline
from .pipelines.registration import LOADING_BASE_CLASSES
from .pipelines.vae import VAEPipeline
from .scheduling_vdm import VDMScheduler, VDMSchedulerOutput

# diffusers' component loader finds these base classes by name in the library named in model_index.json
# (see hf_ddpm/pipelines/registration.py); they are re-exported for it, not as hf_ddpm API.
ModelMixin = LOADING_BASE_CLASSES["ModelMixin"]
SchedulerMixin = LOADING_BASE_CLASSES["SchedulerMixin"]
ConfigMixin = LOADING_BASE_CLASSES["ConfigMixin"]
DiffusionPipeline = LOADING_BASE_CLASSES["DiffusionPipeline"]

__version__ = "0.1.0"

__all__ = [
    "DenoisingUNet",
    "DenoisingUNetOutput",
    "ELBOOutput",
    "GaussianVAE",
    "IWAEOutput",
    "HFDDPMPipeline",
    "NLLResult",
    "TrainingReport",
    "VDMScheduler",
    "VDMSchedulerOutput",
    "VAEELBOOutput",
    "VAEPipeline",
    "losses",
    "push_pipeline_to_hub",
    "render_model_card",
    "save_pipeline_repo",
]
