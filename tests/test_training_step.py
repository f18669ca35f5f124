"""What the training step calls for the network: eager, compiled, or CUDA graphs where they apply (the CUDA capture
itself is mocked on a machine without CUDA; it runs in benchmarks/gpu_readme_job.sh); the one test of the suite that
compiles (marked ``compile``: ``pytest -m "not compile"`` leaves it out)."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file

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
