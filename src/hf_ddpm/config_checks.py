"""Checks of a network's config before anything is allocated, shared by every network (a hand-edited or hostile
config.json, or a user's arguments): values of the wrong type or range fail in one line naming the field, and a
network too large for this machine's memory, or for an accelerator's free memory, fails with the figures.

Each network estimates its size from its config alone, as lower bounds on its parameters and the activation values
of one image (its ``size_lower_bounds`` method); the checks here compare them, in float32, with the memory there is.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

#: The share of an accelerator's free memory a network moved there may need: the rest is left to the CUDA
#: libraries' workspaces (cuBLAS, cuDNN) and the caching allocator's fragmentation.
ACCELERATOR_MEMORY_SHARE = 0.9


def is_integer(value: object) -> bool:
    """True for an integer that is not a bool (JSON's ``true`` loads as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """True for an integer or float that is not a bool (a string such as ``"0.1"`` is not one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_integer(network: str, name: str, value: object, minimum: int = 1) -> None:
    """Raise ``ValueError`` (one line, naming ``network``'s config field ``name``) unless ``value`` is an integer
    >= ``minimum``."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{network} config: {name} must be an integer >= {minimum}, got {value!r}.")


def check_integer_list(network: str, name: str, values: object, minimum: int = 1) -> None:
    """Raise ``ValueError`` (one line, naming the field) unless ``values`` is a list (or tuple) of integers >=
    ``minimum``."""
    is_list = isinstance(values, Sequence) and not isinstance(values, str)
    if not is_list or not all(is_integer(v) and v >= minimum for v in values):
        raise ValueError(f"{network} config: {name} must be a list of integers >= {minimum}, got {values!r}.")


def check_finite_number(network: str, name: str, value: object) -> None:
    """Raise ``ValueError`` (one line, naming the field) unless ``value`` is a finite integer or float."""
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{network} config: {name} must be a finite number, got {value!r}.")


def available_memory_bytes() -> int | None:
    """The memory this machine can still give a process, in bytes: ``MemAvailable`` of /proc/meminfo (Linux), else
    the free physical pages (``os.sysconf``); None where neither can be read."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def float32_bytes(parameters: int, activations: int) -> int:
    """Bytes of ``parameters`` weights and ``activations`` activation values in float32."""
    return 4 * (parameters + activations)


def describe_size(parameters: int, activations: int) -> str:
    """``at least 1.2 GB in float32 (N parameters and M activation values at batch 1)``, for the messages."""
    needed = float32_bytes(parameters, activations)
    return (
        f"at least {needed / 1e9:,.1f} GB in float32 ({parameters:,} parameters and {activations:,} activation "
        "values at batch 1)"
    )


def check_fits_in_memory(subject: str, parameters: int, activations: int, advice: str) -> None:
    """Raise ``ValueError`` (one line with the figures) when ``parameters`` weights and ``activations`` activation
    values at batch 1, in float32, exceed the memory available (:func:`available_memory_bytes`; no check where it
    cannot be read). ``subject`` names the network and the config values that size it; ``advice`` says how to make
    it smaller."""
    available = available_memory_bytes()
    if available is not None and float32_bytes(parameters, activations) > available:
        raise ValueError(
            f"{subject} needs {describe_size(parameters, activations)}, more than the {available / 1e9:,.1f} GB of "
            f"memory available: {advice}, or a machine with more memory."
        )


def check_fits_on_accelerator(subject: str, parameters: int, activations: int, device: torch.device | str) -> None:
    """Raise ``ValueError`` (one line with the figures) when ``parameters`` weights and ``activations`` activation
    values at batch 1, in float32, exceed :data:`ACCELERATOR_MEMORY_SHARE` of the free memory of the CUDA
    ``device`` (``torch.cuda.mem_get_info``): checked before a network is moved there. Other devices, and CUDA
    where it is not available, pass unchecked."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    free = torch.cuda.mem_get_info(device)[0]
    if float32_bytes(parameters, activations) > ACCELERATOR_MEMORY_SHARE * free:
        raise ValueError(
            f"{subject} needs {describe_size(parameters, activations)}, more than {ACCELERATOR_MEMORY_SHARE:.0%} of "
            f"the {free / 1e9:,.1f} GB free on {device} (the rest is left to CUDA's workspaces): free memory on that "
            "GPU (other processes hold it), or choose another --device."
        )
