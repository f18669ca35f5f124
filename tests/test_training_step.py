"""What the training step calls for the network: eager, compiled, or CUDA graphs where they apply (the CUDA capture
itself is mocked on a machine without CUDA; it runs in benchmarks/gpu_readme_job.sh); the one test of the suite that
compiles (marked ``compile``: ``pytest -m "not compile"`` leaves it out)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.utils._pytree as pytree
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TINY_TRAIN
from hf_ddpm import DenoisingUNet
from hf_ddpm.training_utils import CUDAGraphedNetwork, cuda_graph_refusal, training_forward


@pytest.mark.parametrize(
    "device, processes, accumulation, model, reason",
    [
        ("cpu", 1, 1, "ddpm", "the device is cpu, not CUDA"),
        ("cuda", 2, 1, "ddpm", "2 processes (DDP)"),
        ("cuda", 1, 4, "ddpm", "gradient accumulation"),
        ("cuda", 1, 1, "vdm", "--model vdm"),
        ("cuda", 1, 1, "ddpm", ""),
    ],
)
def test_cuda_graphs_apply_to_one_cuda_process_training_a_ddpm(device, processes, accumulation, model, reason):
    assert cuda_graph_refusal(torch.device(device), processes, accumulation, model) == reason


def flags(**values):
    defaults = {"compile": False, "cuda_graphs": False, "gradient_accumulation_steps": 1}
    return types.SimpleNamespace(**{**defaults, **values})


def test_the_training_forward_is_the_model_unless_asked_and_says_why_graphs_do_not_apply():
    model = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=())
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    assert training_forward(model, flags(), "ddpm", accelerator, (2, 1, 8, 8)) == (model, "eager")
    graphed, words = training_forward(model, flags(cuda_graphs=True), "ddpm", accelerator, (2, 1, 8, 8))
    assert graphed is model and words == "eager (no CUDA graphs with the device is cpu, not CUDA)"


def test_the_graphed_network_returns_the_networks_sample_and_leaves_no_gradient(monkeypatch):
    captured = {}

    def capture(module, sample_args):  # what make_graphed_callables returns behaves as the module does
        captured["shapes"] = [tuple(a.shape) for a in sample_args]
        module(*sample_args).sum().backward()  # its warm-up runs backward passes
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    torch.manual_seed(0)
    unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=())
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.1)
    graphed = CUDAGraphedNetwork(unet, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert captured["shapes"] == [(2, 1, 8, 8), (2,)]
    assert all(p.grad is None for p in unet.parameters())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    assert torch.equal(graphed(x, t).sample, unet(x, t).sample)
    assert list(graphed.parameters()) == list(unet.parameters())  # the optimizer's parameters are the graph's


class HostDeviceCrossings(TorchDispatchMode):
    """Records every operation that moves data between the host and another device, or reads a value back
    from a device (``.item()``, ``bool(tensor)``): on a GPU each of them makes the host wait for all work queued
    before it. (Reading a host tensor, such as the step count of the foreach AdamW, waits for nothing.)"""

    def __init__(self):
        super().__init__()
        self.crossings: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        devices = {x.device.type for x in pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)}
        if len(devices) > 1 or (func is torch.ops.aten._local_scalar_dense.default and devices != {"cpu"}):
            self.crossings.append(f"{func} on {sorted(devices)}")
        return out


def test_the_crossings_recorder_sees_copies_to_and_from_a_device():
    with HostDeviceCrossings() as recorder:
        torch.ones(3).to("meta")
        torch.ones(3).sum().item()  # a host value: no crossing
        torch.ones(3, device="meta").sum()
    assert recorder.crossings == ["aten._to_copy.default on ['cpu', 'meta']"]


@pytest.mark.parametrize(
    "model, loss_type",
    [
        ("ddpm", "hybrid"),
        ("ddpm", "hybrid_decoder"),
        ("ddpm", "vlb"),
        ("ddpm", "simple --variance_type fixed_small"),
        ("vae", "hybrid"),
    ],
)
def test_a_training_step_on_a_device_neither_copies_from_the_host_nor_reads_back(model, loss_type):
    """train.py's step (the objective's loss at drawn timesteps, backward, clipping, the skipped-update flag, AdamW,
    the timestep sampler's update and the EMA) on a stand-in accelerator, the meta device, where any host copy or
    read is visible: after the first step, which copies the chain's constants to the device once, none. (The VDM's
    forward asks autocast about its device, which meta is not; the fused AdamW kernel has no meta version, so the
    foreach one stands in for it.)"""
    from diffusers.training_utils import EMAModel

    from hf_ddpm.objectives import build_model_and_objective
    from hf_ddpm.training_args import parse_arguments
    from hf_ddpm.training_utils import SkippedUpdates

    flags = [*TINY_TRAIN, "--model", model, "--loss_type", *loss_type.split(), "--output_dir", "x"]
    network, objective = build_model_and_objective(*parse_arguments(flags))
    network.to("meta")
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, foreach=True)
    ema, skipped = EMAModel(network.parameters(), foreach=True), SkippedUpdates("x", torch.device("meta"))
    images = torch.zeros(16, 1, 28, 28, device="meta")
    crossings = []
    for _ in range(2):
        with HostDeviceCrossings() as recorder:
            out = objective.loss(network, images)
            out.loss.mean().backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            fused = types.SimpleNamespace()  # what the fused AdamW would be handed: its skip flag
            skipped.before_step(fused, grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            objective.observe(out.feedback)
            ema.step(network.parameters())
        crossings.append(recorder.crossings)
    assert crossings[1] == [] and fused.found_inf.device.type == "meta"
    if model == "ddpm":  # the recorder saw the constants' one-time copies
        assert crossings[0]


import train  # noqa: E402  (importable once helpers put training/ on sys.path)


@pytest.mark.compile
def test_a_compiled_training_step_trains_the_weights_the_eager_step_trains(tmp_path, caplog):
    flags = [*TINY_TRAIN, "--max_train_steps", "3", "--checkpointing_steps", "100"]
    with caplog.at_level("INFO"):
        compiled = train.main(["--output_dir", str(tmp_path / "compiled"), *flags, "--compile"])
    assert any("training step torch.compile;" in m for m in caplog.messages)
    eager = train.main(["--output_dir", str(tmp_path / "eager"), *flags, "--compile", "false"])
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(compiled / weights), load_file(eager / weights)
    for k in a:  # the compiled kernels may round differently, no more
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
