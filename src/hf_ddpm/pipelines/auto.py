"""The pipeline a saved model needs, found from its ``model_index.json``: a local folder or a Hub repo id alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from ..hub.loading import pipeline_class_name, pipeline_folder, read_model_index
from .ddpm import HFDDPMPipeline
from .vae import VAEPipeline
from .vdm import VDMPipeline

#: Every public hf_ddpm pipeline class, by the name ``model_index.json`` records.
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    cls.__name__: cls for cls in (HFDDPMPipeline, VAEPipeline, VDMPipeline)
}


def load_pipeline(model: str | Path, revision: str | None = None, **kwargs: Any) -> DiffusionPipeline:
    """``model`` (a folder written by ``save_pretrained``, or a Hub repo id ``ORG/NAME`` at ``revision``) loaded
    with the hf_ddpm pipeline class its ``model_index.json`` names; ``kwargs`` go to that class's
    ``from_pretrained``. Raises ``ValueError`` when it names no hf_ddpm pipeline."""
    folder = pipeline_folder(model, revision=revision)
    class_name = pipeline_class_name(read_model_index(folder))
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{model} holds a {class_name}, not an hf_ddpm pipeline ({', '.join(PIPELINE_CLASSES)}): load it with "
            "diffusers' DiffusionPipeline.from_pretrained."
        )
    return PIPELINE_CLASSES[class_name].from_pretrained(model, revision=revision, **kwargs)
