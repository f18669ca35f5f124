"""The pipeline a saved model needs, found from its ``model_index.json``: a local folder or a Hub repo id alike; the
one loader of the CLI, the demo and the benchmarks, and the scheduler a pipeline samples with, chosen by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)

from ..config_checks import check_fits_on_accelerator
from ..hub.loading import pipeline_class_name, pipeline_folder, read_model_index
from .ddpm import HFDDPMPipeline
from .vae import VAEPipeline
from .vdm import VDMPipeline

#: Every public hf_ddpm pipeline class, by the name ``model_index.json`` records.
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    cls.__name__: cls for cls in (HFDDPMPipeline, VAEPipeline, VDMPipeline)
}


def default_device() -> str:
    """``"cuda"`` where torch sees a CUDA device, else ``"cpu"``: what the command line and the benchmarks run on
    unless ``--device`` says otherwise."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str | Path, revision: str | None = None, **kwargs: Any) -> DiffusionPipeline:
    """``model`` (a folder written by ``save_pretrained``, or a Hub repo id ``ORG/NAME`` at ``revision``) loaded
    with the hf_ddpm pipeline class its ``model_index.json`` names; ``kwargs`` go to that class's
    ``from_pretrained``. Raises ``ValueError`` for a name that is neither a folder nor a repo id, or when the model
    names no hf_ddpm pipeline."""
    if not Path(model).is_dir() and "/" not in str(model):
        raise ValueError(f"{model}: no such model folder (or Hub repo id ORG/NAME).")
    folder = pipeline_folder(model, revision=revision)
    class_name = pipeline_class_name(read_model_index(folder))
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{model} holds a {class_name}, not an hf_ddpm pipeline ({', '.join(PIPELINE_CLASSES)}): load it with "
            "diffusers' DiffusionPipeline.from_pretrained."
        )
    return PIPELINE_CLASSES[class_name].from_pretrained(model, revision=revision, **kwargs)


def is_connection_error(error: BaseException) -> bool:
    """True when ``error``, or an error it was raised from, is a failure to reach a server (refused, timed out,
    offline mode, a proxy), whichever HTTP library huggingface_hub uses."""
    seen: BaseException | None = error
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if isinstance(seen, (ConnectionError, TimeoutError, OfflineModeIsEnabled)) or names & {
            "TransportError",
            "TimeoutException",
            "RequestException",
        }:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def hub_error_message(model: str, revision: str | None, error: BaseException) -> str | None:
    """One line for a Hub or network failure while loading ``model`` (None for other errors): the Hub unreachable,
    no such repo, a gated repo, no such revision, or another answer of the Hub."""
    endpoint = constants.ENDPOINT
    if isinstance(error, GatedRepoError):
        return (
            f"{model} is a gated repo on the Hub at {endpoint}: accept its terms on its page, then log in "
            "(hf auth login)."
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"no such repo {model} on the Hub at {endpoint} (or it is private: log in with hf auth login or set "
            "HF_TOKEN); a local model is a folder that exists."
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{model} has no revision {revision!r} on the Hub at {endpoint}; pass an existing --revision."
    if isinstance(error, (RevisionResolutionError, LocalEntryNotFoundError)) or is_connection_error(error):
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        reason = " ".join(str(cause).split()) or type(cause).__name__
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        return (
            f"could not reach the Hub at {endpoint} to load {model} ({reason}) and it is not in the local cache; "
            "check the network and HF_ENDPOINT, or give a local folder."
        )
    if isinstance(error, HfHubHTTPError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the Hub at {endpoint} could not give {model}: {first}"
    return None


def open_pipeline(model: str, revision: str | None, device: str) -> DiffusionPipeline:
    """:func:`load_pipeline` on ``device``, for the command line and the demo: an error in finding or reading the
    model (no such folder or repo, the Hub unreachable, not an hf_ddpm pipeline, ...) is raised as a ``ValueError``
    of one line that says what to do; any other error propagates as it is."""
    try:
        pipeline = load_pipeline(model, revision=revision)
    except Exception as error:
        message = hub_error_message(model, revision, error)
        if message is None:
            if not isinstance(error, (OSError, ValueError)):
                raise
            text = " ".join(str(error).split())
            message = text if model in text else f"Could not load {model}: {text}"
        raise ValueError(message) from error
    check_fits_on_device(pipeline, model, device)
    return pipeline.to(device)


def check_fits_on_device(pipeline: DiffusionPipeline, model: str, device: str) -> None:
    """Refuse (``ValueError``, one line with the figures) to move ``pipeline``, loaded from ``model``, to a CUDA
    ``device`` whose free memory its networks would not fit in at batch 1
    (:func:`hf_ddpm.config_checks.check_fits_on_accelerator`): the sum of their ``size_lower_bounds()``, estimated
    from their configs (the parameter count of a network without one). Other devices pass unchecked."""
    sizes = [
        network.size_lower_bounds()
        if hasattr(network, "size_lower_bounds")
        else (sum(p.numel() for p in network.parameters()), 0)
        for network in pipeline.components.values()
        if isinstance(network, torch.nn.Module)
    ]
    parameters, activations = (sum(column) for column in zip(*sizes))
    check_fits_on_accelerator(f"{model} ({type(pipeline).__name__})", parameters, activations, device)


def with_scheduler(pipeline: DiffusionPipeline, name: str) -> DiffusionPipeline:
    """A pipeline of ``pipeline``'s class sharing its networks, with the sampler ``name`` of its
    ``scheduler_choices`` built anew (so that concurrent requests never share scheduler state), its progress bars
    configured as ``pipeline``'s. Raises ``ValueError`` for a name ``pipeline`` does not offer."""
    choices = pipeline.scheduler_choices
    if name not in choices:
        if not choices:
            raise ValueError(f"scheduler {name!r}: a {type(pipeline).__name__} samples without a scheduler.")
        raise ValueError(f"scheduler must be one of {', '.join(choices)}, got {name!r}.")
    copy = type(pipeline)(**{**pipeline.components, "scheduler": choices[name]()})
    copy.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return copy
