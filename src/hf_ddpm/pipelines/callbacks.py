"""diffusers' step-end callback, as hf_ddpm's sampling pipelines run it.

A pipeline's ``__call__`` takes ``callback_on_step_end(pipeline, step_index, timestep, callback_kwargs) -> dict``
(a function, or a diffusers ``PipelineCallback`` / ``MultiPipelineCallbacks``) and the names of the tensors it
wants, ``callback_on_step_end_tensor_inputs``, from the pipeline's ``_callback_tensor_inputs``. After each step the
callback gets those tensors by name; a ``"latents"`` entry in the dict it returns replaces x for the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

StepEndCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def callback_tensor_names(
    pipeline: Any, callback: StepEndCallback | PipelineCallback | MultiPipelineCallbacks | None, names: Sequence[str]
) -> list[str]:
    """The tensors ``callback`` is given after each step: a diffusers ``PipelineCallback``'s own ``tensor_inputs``,
    else ``names``. Raises ``ValueError``, before any step, for a name the pipeline does not offer."""
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        names = callback.tensor_inputs
    offered = pipeline._callback_tensor_inputs
    unknown = [name for name in names if name not in offered]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs {unknown} are not offered by {type(pipeline).__name__}: choose "
            f"from {', '.join(offered)}."
        )
    return list(names)


def run_step_end_callback(
    pipeline: Any,
    callback: StepEndCallback,
    step_index: int,
    timestep: torch.Tensor,
    tensors: Mapping[str, torch.Tensor | None],
    names: Sequence[str],
) -> torch.Tensor:
    """Call ``callback(pipeline, step_index, timestep, {name: tensors[name] for name in names})`` and return the
    latents of the next step: the ``"latents"`` of the dict it returns, else ``tensors["latents"]``."""
    outputs = callback(pipeline, step_index, timestep, {name: tensors[name] for name in names}) or {}
    return outputs.get("latents", tensors["latents"])
