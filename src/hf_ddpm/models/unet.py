"""DenoisingUNet: the network behind p_theta(x_{t-1} | x_t), sized to train on a 2-core CPU.

A plain DDPM U-Net read top to bottom: a sinusoidal embedding of the timestep, residual blocks with GroupNorm that
add the embedding, optional self-attention at the coarse resolutions, and skip connections from every block of the
down path to the up path. Downsampling is a stride-2 convolution with padding, so 28x28 goes 28 -> 14 -> 7 with no
padding of the image; upsampling convolves at the coarse resolution, then repeats pixels (nearest), which costs a
quarter of the usual upsample-then-convolve at the fine resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..config_checks import check_fits_in_memory, check_integer, check_integer_list, is_real


@dataclass
class DenoisingUNetOutput(BaseOutput):
    """Output of :class:`DenoisingUNet`.

    Args:
        sample (`torch.Tensor` of shape (B, out_channels, H, W)): the prediction (epsilon, x_0 or v, per the
            scheduler's ``prediction_type``), followed by C variance channels when ``learn_variance``.
    """

    sample: torch.Tensor


#: b of :func:`default_unet_layout`'s widths (b, 2b, 2b, ...) by image channels: 1 (grayscale) and 3 (RGB).
BASE_WIDTHS = {1: 32, 3: 48}


def default_unet_layout(
    resolution: int, channels: int, base_width: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The default network for images of ``resolution`` pixels a side and ``channels`` channels:
    ``(block_out_channels, attention_resolutions)``.

    The rule: halve the resolution while the half is an integer of at least 7 (28 -> 28, 14, 7; 32 -> 32, 16, 8;
    64 -> 64, 32, 16, 8; 16 -> 16, 8), one level per size; widths (b, 2b, 2b, ...) with b = ``base_width``, by
    default :data:`BASE_WIDTHS` (32 for grayscale, 48 for RGB); self-attention at the coarsest level only (the
    middle block has it too). ``default_unet_layout(28, 1) == ((32, 64, 64), (7,))``, the MNIST default of
    :class:`DenoisingUNet`.

    Raises ``ValueError`` for a resolution below 1, channels other than 1 and 3, or a base width below 1.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}.")
    if channels not in BASE_WIDTHS:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    base = BASE_WIDTHS[channels] if base_width is None else base_width
    if base < 1:
        raise ValueError(f"base_width must be a positive number of channels, got {base_width}.")
    sizes = [resolution]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= 7:
        sizes.append(sizes[-1] // 2)
    return (base, *(2 * base for _ in sizes[1:])), coarsest_level_attention(resolution, len(sizes))


def coarsest_level_attention(resolution: int, levels: int) -> tuple[int]:
    """``attention_resolutions`` with self-attention at the coarsest of ``levels`` levels only: the feature-map size
    ``resolution / 2^(levels - 1)`` (the rule of :func:`default_unet_layout`, for any widths)."""
    return (resolution // 2 ** (max(levels, 1) - 1),)


def unet_size_lower_bounds(
    sample_size: int, block_out_channels: Sequence[int], layers_per_block: int
) -> tuple[int, int]:
    """(parameters, activation values of one image), lower bounds of a :class:`DenoisingUNet` from its config alone,
    before anything is allocated. With L = ``layers_per_block``, c_l the width and s_l = sample_size / 2^l the size
    of level l:

    parameters >= sum_l (2 L + 1) 9 c_l^2 (the second 3x3 convolution, c_l -> c_l, of each residual block: L on the
    down path and L + 1 on the up path of each level);
    activations >= sum_l L c_l s_l^2 (the feature maps the down path keeps for the up path's skip connections).
    """
    parameters = sum((2 * layers_per_block + 1) * 9 * width**2 for width in block_out_channels)
    activations = sum(
        layers_per_block * width * (sample_size // 2**level) ** 2 for level, width in enumerate(block_out_channels)
    )
    return parameters, activations


def check_unet_config(
    sample_size: object,
    in_channels: object,
    block_out_channels: object,
    layers_per_block: object,
    attention_resolutions: object,
    attention_heads: object,
    dropout: object,
    norm_num_groups: object,
    fourier_features: object,
) -> None:
    """Refuse, in one line (``ValueError``), a :class:`DenoisingUNet` config of wrong types or ranges (a hand-edited
    or hostile config.json), and one whose weights and activations at batch 1 (float32,
    :func:`unet_size_lower_bounds`) would not fit in the memory available, before anything is allocated."""
    counts = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "layers_per_block": layers_per_block,
        "attention_heads": attention_heads,
        "norm_num_groups": norm_num_groups,
    }
    for name, value in counts.items():
        check_integer("DenoisingUNet", name, value)
    check_integer_list("DenoisingUNet", "block_out_channels", block_out_channels)
    check_integer_list("DenoisingUNet", "attention_resolutions", attention_resolutions)
    check_integer_list("DenoisingUNet", "fourier_features", fourier_features, minimum=0)
    if not block_out_channels:
        raise ValueError("DenoisingUNet config: block_out_channels must name at least one level, got [].")
    if not is_real(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"DenoisingUNet config: dropout must be a number in [0, 1), got {dropout!r}.")
    check_fits_in_memory(
        f"DenoisingUNet config (sample_size {sample_size}, block_out_channels {list(block_out_channels)})",
        *unet_size_lower_bounds(sample_size, block_out_channels, layers_per_block),
        "use fewer or narrower levels or smaller images",
    )


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al.), (B, dim): [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


#: The exponents of VDM's Fourier features (Kingma et al. 2021): on [-1, 1], sin(2^8 pi x) turns a whole period
#: over about one intensity level of 8-bit data (2/255), so the network sees the last bits the likelihood counts.
VDM_FOURIER_FEATURES = (7, 8)


def base2_fourier_features(sample: torch.Tensor, exponents: Sequence[int]) -> torch.Tensor:
    """VDM's Fourier features of the input: [sin(2^n pi x), cos(2^n pi x)] for every channel c and exponent n.

    (B, C, H, W) -> (B, 2 C N, H, W) with N = len(exponents): the sines first, then the cosines, each ordered
    channel by channel and, within a channel, exponent by exponent (VDM's ``Base2FourierFeatures``, whose
    ``start=6, stop=8`` with w = 2^k 2 pi are the exponents n = k + 1 = 7, 8 here).
    """
    frequencies = math.pi * 2.0 ** torch.tensor(list(exponents), dtype=sample.dtype, device=sample.device)
    angles = (sample[:, :, None] * frequencies[None, None, :, None, None]).flatten(1, 2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time embedding (scale and shift), GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, 2 * out_channels)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # every block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embedding(embedding)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


#: From this many positions on, self-attention hands PyTorch contiguous q, k, v, which its fused (flash) CPU kernel
#: takes: forward + backward 2.5-2.9x faster at 28x28 = 784 positions, fp32 or bf16, on a 2-core Zen 4. On fewer
#: positions the strided tensors' math path is as fast or faster (3x faster at 7x7 in bf16).
FUSED_ATTENTION_MIN_POSITIONS = 256


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} must be divisible by attention_heads={num_heads}.")
        self.num_heads = num_heads
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)
        if h * w >= FUSED_ATTENTION_MIN_POSITIONS:  # positions-major q, k, v: the fused kernel, not the math path
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class DenoisingUNet(ModelMixin, ConfigMixin):
    r"""U-Net denoiser eps_theta(x_t, t) (or x_0 / v), with optional learned variance channels.

    Args:
        sample_size (`int`): height and width of the images; must be divisible by 2^(len(block_out_channels)-1).
        in_channels (`int`): C, image channels (1 for MNIST).
        out_channels (`int`, *optional*): defaults to C, or 2C with ``learn_variance``.
        learn_variance (`bool`): emit 2C channels, the prediction and the learned-range variance interpolation v.
        block_out_channels (`tuple[int]`): channels at each resolution; one downsampling between consecutive levels.
        layers_per_block (`int`): residual blocks per level on the down path (the up path has one more).
        attention_resolutions (`tuple[int]`): feature-map sizes (e.g. 7) at which blocks are followed by
            self-attention; the middle block always has attention when this is non-empty.
        attention_heads (`int`): heads of each self-attention layer.
        dropout (`float`): dropout inside the residual blocks.
        norm_num_groups (`int`): GroupNorm groups (reduced to a divisor of the channels where needed).
        fourier_features (`tuple[int]`): exponents n of :func:`base2_fourier_features` concatenated to the input
            (VDM uses (7, 8): periods 2^(1-n), down to the 8-bit bin width, for data in [-1, 1]); empty for none.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        out_channels: int | None = None,
        learn_variance: bool = True,
        block_out_channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_resolutions: Sequence[int] = (7,),
        attention_heads: int = 4,
        dropout: float = 0.0,
        norm_num_groups: int = 8,
        fourier_features: Sequence[int] = (),
    ):
        super().__init__()
        check_unet_config(
            sample_size,
            in_channels,
            block_out_channels,
            layers_per_block,
            attention_resolutions,
            attention_heads,
            dropout,
            norm_num_groups,
            fourier_features,
        )
        levels = len(block_out_channels)
        if sample_size % (2 ** (levels - 1)):
            raise ValueError(
                f"sample_size={sample_size} cannot be halved {levels - 1} times (block_out_channels has {levels} "
                f"levels); use a resolution divisible by {2 ** (levels - 1)} or fewer levels."
            )
        expected_out = in_channels * (2 if learn_variance else 1)
        if out_channels is not None and out_channels != expected_out:
            raise ValueError(
                f"out_channels={out_channels} does not match in_channels={in_channels} with "
                f"learn_variance={learn_variance} (expected {expected_out})."
            )
        base = block_out_channels[0]
        self.embedding_dim = 4 * base
        self.time_mlp = nn.Sequential(
            nn.Linear(base, self.embedding_dim), nn.SiLU(), nn.Linear(self.embedding_dim, self.embedding_dim)
        )
        self.conv_in = nn.Conv2d(in_channels * (1 + 2 * len(fourier_features)), base, 3, padding=1)

        def block(cin: int, cout: int, size: int) -> nn.ModuleList:
            layers = [ResidualBlock(cin, cout, self.embedding_dim, dropout, norm_num_groups)]
            if size in attention_resolutions:
                layers.append(SelfAttention(cout, attention_heads, norm_num_groups))
            return nn.ModuleList(layers)

        self.down = nn.ModuleList()
        skip_channels = [base]
        channels, size = base, sample_size
        for level, width in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                self.down.append(block(channels, width, size))
                channels = width
                skip_channels.append(channels)
            if level < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(channels, channels, 3, stride=2, padding=1)]))
                size //= 2
                skip_channels.append(channels)

        self.mid = nn.ModuleList([ResidualBlock(channels, channels, self.embedding_dim, dropout, norm_num_groups)])
        if attention_resolutions:
            self.mid.append(SelfAttention(channels, attention_heads, norm_num_groups))
        self.mid.append(ResidualBlock(channels, channels, self.embedding_dim, dropout, norm_num_groups))

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(block_out_channels))):
            for _ in range(layers_per_block + 1):
                self.up.append(block(channels + skip_channels.pop(), width, size))
                channels = width
            if level > 0:
                self.up.append(
                    nn.ModuleList(
                        [nn.Conv2d(channels, channels, 3, padding=1), nn.Upsample(scale_factor=2, mode="nearest")]
                    )
                )
                size *= 2

        self.norm_out = _group_norm(channels, norm_num_groups)
        self.conv_out = nn.Conv2d(channels, expected_out, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def size_lower_bounds(self) -> tuple[int, int]:
        """(parameters, activation values of one image) of this network, lower bounds from its config alone
        (:func:`unet_size_lower_bounds`): what is checked against a device's memory before moving it there."""
        config = self.config
        return unet_size_lower_bounds(config.sample_size, config.block_out_channels, config.layers_per_block)

    @staticmethod
    def _run_layers(layers: nn.ModuleList, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, embedding) if isinstance(layer, ResidualBlock) else layer(h)
        return h

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> DenoisingUNetOutput | tuple:
        """Predict from a noisy batch.

        Args:
            sample (`torch.Tensor`): x_t, (B, C, H, W) with H = W = ``sample_size``.
            timestep (`torch.Tensor` or `int`): t, a scalar or (B,) integer timesteps.
            return_dict (`bool`): return a :class:`DenoisingUNetOutput` rather than a tuple.

        Returns:
            :class:`DenoisingUNetOutput` with ``sample`` of shape (B, out_channels, H, W).
        """
        if sample.dim() != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"DenoisingUNet expects (B, {self.config.in_channels}, H, W) input, got {tuple(sample.shape)}."
            )
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(sample.shape[0])
        embedding = self.time_mlp(timestep_embedding(timesteps, self.config.block_out_channels[0]).to(sample.dtype))
        if self.config.fourier_features:
            sample = torch.cat([sample, base2_fourier_features(sample, self.config.fourier_features)], dim=1)
        h = self.conv_in(sample)
        skips = [h]
        for layers in self.down:
            h = self._run_layers(layers, h, embedding)
            skips.append(h)
        h = self._run_layers(self.mid, h, embedding)
        for layers in self.up:
            if isinstance(layers[-1], nn.Upsample):
                h = self._run_layers(layers, h, embedding)
            else:
                h = self._run_layers(layers, torch.cat([h, skips.pop()], dim=1), embedding)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if not return_dict:
            return (out,)
        return DenoisingUNetOutput(sample=out)
