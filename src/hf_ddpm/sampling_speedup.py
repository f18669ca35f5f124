"""Sampling as fast as training: the network of a pipeline run in bf16 where the hardware computes it natively, in
channels_last where that is faster, and compiled where the compilation pays for itself within the sampling it
speeds up. The scheduler's arithmetic stays in float32 (only the network's forward runs under autocast).

Measured on a 2-core AMD EPYC Zen 4 (AVX512-BF16), torch 2.13, the default 28x28 network, forward of 250 images
(``python benchmarks/sampling_speed.py --forward``; ``benchmarks/README.md``): float32 eager 0.909 s, channels_last
0.745 s, compiled 0.587 s; bf16 eager 0.493 s, channels_last 0.561 s, compiled 0.309 s; each compilation ~35-40 s.
Restricted to AVX2 kernels (float32): eager 0.948 s, channels_last 0.784 s, compiled 0.745 s (42 s to compile).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Seconds one compilation of the network for sampling takes (measured 34-42 s on 2 cores, above).
SAMPLING_COMPILE_SECONDS = 40.0
#: Seconds a compiled forward saves per image against the fastest eager layout, by precision and the CPU's kernels
#: (torch.backends.cpu.get_cpu_capability()), from the measurements above: bf16 0.493 -> 0.309 s, float32 with
#: AVX-512 0.745 (channels_last) -> 0.587 s, float32 with AVX2 0.784 (channels_last) -> 0.745 s, per 250 images.
COMPILED_SECONDS_SAVED_PER_IMAGE_FORWARD = {
    ("bf16", "AVX512"): 0.74e-3,
    ("fp32", "AVX512"): 0.63e-3,
    ("fp32", "AVX2"): 0.16e-3,
}
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class SamplingSpeedup:
    """How a pipeline's network runs while it samples: ``precision`` ("fp32" or "bf16", the forward under bf16
    autocast), ``channels_last`` (weights and inputs), ``compiled`` (torch.compile of the forward), and ``reason``,
    one line saying why, for the log."""

    precision: str
    channels_last: bool
    compiled: bool
    reason: str


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flags of /proc/cpuinfo on
    Linux) and torch may use those instructions (its kernels are AVX-512's: not where ``ATEN_CPU_CAPABILITY``
    restricts them to AVX2, as an AVX2-only machine is emulated, and bf16 would be computed by conversions);
    False elsewhere, including where the flags cannot be read."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """True where ``device`` computes bf16 natively: a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def compiled_sampling_pays(precision: str, image_forwards: int, cpu_capability: str) -> bool:
    """True where compiling saves more than it costs: image_forwards x (seconds saved per image-forward) >
    SAMPLING_COMPILE_SECONDS, with the saving measured for this precision and CPU kernel set (none known: False)."""
    saved = COMPILED_SECONDS_SAVED_PER_IMAGE_FORWARD.get((precision, cpu_capability), 0.0)
    return image_forwards * saved > SAMPLING_COMPILE_SECONDS


def choose_sampling_speedup(
    device: torch.device | str, image_forwards: int, precision: str = "auto", compile: bool | None = None
) -> SamplingSpeedup:
    """The settings for sampling ``image_forwards`` network evaluations of one image (images x steps) on ``device``.

    precision "auto": bf16 where the device computes it natively (:func:`native_bf16`), else fp32. channels_last:
    on CPU in float32 only (1.21x eager there, 0.88x in bf16). compile None: on a CPU where
    :func:`compiled_sampling_pays`; never on other devices (not measured there); True or False as given.
    """
    device = torch.device(device)
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"sampling precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {precision!r}.")
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    if compile is None:
        compiled = device.type == "cpu" and compiled_sampling_pays(precision, image_forwards, capability)
        verdict = "pays" if compiled else "does not pay"
        why = f"compiling {verdict} for {image_forwards:,} image-forwards in {precision} with {capability} kernels"
    else:
        compiled = compile
        why = f"compile {'on' if compile else 'off'} as asked"
    channels_last = device.type == "cpu" and precision == "fp32" and not compiled
    return SamplingSpeedup(precision, channels_last, compiled, f"sampling network: {precision}, {why}")


def _float32_output(output: Any) -> Any:
    """A network output (a ``DenoisingUNetOutput`` or a tuple) with its sample tensor in float32."""
    if isinstance(output, tuple):
        return (output[0].float(), *output[1:])
    output.sample = output.sample.float()
    return output


@contextmanager
def sped_up_network(network: torch.nn.Module, speedup: SamplingSpeedup) -> Iterator[torch.nn.Module]:
    """Within the block, calls of ``network`` run as ``speedup`` says (outputs in float32); afterwards the network
    is as it was (its forward and memory format). The weights are not copied: train no further inside the block."""
    class_forward = type(network).forward.__get__(network)
    device_type = next(network.parameters()).device.type
    memory_format = torch.channels_last if speedup.channels_last else torch.contiguous_format

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sample = sample.contiguous(memory_format=memory_format)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=speedup.precision == "bf16"):
            return _float32_output(class_forward(sample, *args, **kwargs))

    network.to(memory_format=memory_format)
    network.forward = torch.compile(forward) if speedup.compiled else forward
    try:
        yield network
    finally:
        del network.forward
        network.to(memory_format=torch.contiguous_format)


@contextmanager
def fast_sampling(
    pipeline: Any, image_forwards: int, precision: str = "auto", compile: bool | None = None
) -> Iterator[SamplingSpeedup | None]:
    """Within the block, ``pipeline`` samples with its network (``pipeline.unet``, and the autoguidance guide
    ``pipeline.guide_unet`` where it has one, each evaluated ``image_forwards`` times) run as
    :func:`choose_sampling_speedup` decides for ``image_forwards`` (images x steps); yields the decision, or None
    for a pipeline without a ``unet`` (a VAE: one decoder pass, nothing to speed up)."""
    network = getattr(pipeline, "unet", None)
    if network is None:
        yield None
        return
    speedup = choose_sampling_speedup(next(network.parameters()).device, image_forwards, precision, compile)
    with ExitStack() as stack:
        for each in (network, getattr(pipeline, "guide_unet", None)):
            if each is not None:
                stack.enter_context(sped_up_network(each, speedup))
        yield speedup
