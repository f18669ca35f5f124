"""hf_ddpm.sampling_speedup: which settings it chooses where, that each gives the network's numbers (float32 layouts
to float32 rounding, bf16 to bf16's), that the network is as it was afterwards, and the CLI's use of it."""

import json

import numpy as np
import pytest
import torch

from helpers import tiny_ddpm_pipeline, tiny_vae_pipeline
from hf_ddpm import sampling_speedup
from hf_ddpm.cli import main
from hf_ddpm.sampling_speedup import (
    SamplingSpeedup,
    choose_sampling_speedup,
    compiled_sampling_pays,
    fast_sampling,
    sped_up_network,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_sampling_pays_where_the_measured_saving_exceeds_the_compile_time():
    # bf16 with AVX-512: 0.74 ms saved per image-forward against 40 s of compilation -> from 54,055 image-forwards
    assert compiled_sampling_pays("bf16", 1000 * 100, "AVX512")  # hf_ddpm evaluate --num_samples 1000 --steps 100
    assert not compiled_sampling_pays("bf16", 64 * 100, "AVX512")  # train.py's sample grid
    assert not compiled_sampling_pays("bf16", 54_000, "AVX512") and compiled_sampling_pays("bf16", 54_100, "AVX512")
    assert not compiled_sampling_pays("fp32", 1000 * 100, "AVX2")  # 0.16 ms saved: 16 s back for 40 s spent
    assert compiled_sampling_pays("fp32", 1000 * 100, "AVX512")
    assert not compiled_sampling_pays("fp32", 10**9, "DEFAULT")  # no measurement there: never


@pytest.mark.parametrize(
    "native, capability, image_forwards, expected",
    [
        (True, "AVX512", 100_000, ("bf16", False, True)),
        (True, "AVX512", 6_400, ("bf16", False, False)),
        (False, "AVX2", 100_000, ("fp32", True, False)),  # an AVX2-only CPU: channels_last, eager
        (False, "AVX512", 100_000, ("fp32", False, True)),
    ],
)
def test_choose_sampling_speedup_on_cpu(monkeypatch, native, capability, image_forwards, expected):
    monkeypatch.setattr(sampling_speedup, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    speedup = choose_sampling_speedup("cpu", image_forwards)
    assert (speedup.precision, speedup.channels_last, speedup.compiled) == expected
    assert f"{image_forwards:,} image-forwards" in speedup.reason and capability in speedup.reason


def test_choose_sampling_speedup_obeys_explicit_settings_and_refuses_unknown_precision(monkeypatch):
    monkeypatch.setattr(sampling_speedup, "cpu_has_native_bf16", lambda: True)
    forced = choose_sampling_speedup("cpu", 10, precision="fp32", compile=True)
    assert (forced.precision, forced.channels_last, forced.compiled) == ("fp32", False, True)
    assert "as asked" in forced.reason
    assert choose_sampling_speedup("cpu", 10**6, compile=False).compiled is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    on_gpu = choose_sampling_speedup(torch.device("cuda"), 10**6)  # not measured on a GPU: never compiled there
    assert (on_gpu.precision, on_gpu.channels_last, on_gpu.compiled) == ("bf16", False, False)
    with pytest.raises(ValueError, match="sampling precision must be one of auto, fp32, bf16, got 'fp16'"):
        choose_sampling_speedup("cpu", 10, precision="fp16")


def network_and_input():
    pipeline = tiny_ddpm_pipeline()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return pipeline.unet, x, torch.tensor([0, 3, 6, 9])


def test_float32_channels_last_gives_the_network_numbers_and_leaves_it_as_it_was():
    network, x, t = network_and_input()
    with torch.no_grad():
        reference = network(x, t).sample
        with sped_up_network(network, SamplingSpeedup("fp32", True, False, "")):
            assert network.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            fast = network(x, t).sample
        after = network(x, t).sample
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(network) and network.conv_in.weight.is_contiguous()
    assert torch.equal(after, reference)


def test_bf16_runs_the_network_in_bf16_and_returns_float32():
    network, x, t = network_and_input()
    with torch.no_grad():
        reference = network(x, t).sample
        with sped_up_network(network, SamplingSpeedup("bf16", False, False, "")):
            fast = network(x, t).sample
            as_tuple = network(x, t, return_dict=False)[0]
    assert fast.dtype == torch.float32 and as_tuple.dtype == torch.float32
    assert not torch.equal(fast, reference)  # bf16 did run
    # bf16 keeps 8 significant bits: each layer rounds its inputs to a relative 2^-9
    torch.testing.assert_close(fast, reference, rtol=0.05, atol=0.02 * reference.abs().max().item())


def test_fast_sampling_samples_the_same_images_in_float32_and_passes_over_a_vae():
    pipeline = tiny_ddpm_pipeline()
    reference = pipeline(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=5).images
    with fast_sampling(pipeline, 15, precision="fp32", compile=False) as speedup:
        fast = pipeline(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=5).images
    assert speedup.precision == "fp32" and not speedup.compiled
    assert np.abs(np.asarray(fast[0], float) - np.asarray(reference[0], float)).max() <= 1  # 8-bit rounding
    with fast_sampling(tiny_vae_pipeline(), 10) as speedup:
        assert speedup is None


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_ddpm_pipeline().save_pretrained(folder)
    return folder


def test_evaluate_records_how_it_sampled_and_refuses_sampling_flags_without_samples(
    tiny_model_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sampling_speedup, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "result.json"
    base = ["evaluate", str(tiny_model_folder), "--data", "embedded", "--max_images", "4", "--json", str(out)]
    assert main([*base, "--sampling_precision", "bf16"]) == 2
    message = capsys.readouterr().err
    assert "--sampling_precision applies to the samples of --num_samples; drop it, or add --num_samples" in message
    assert main([*base, "--sampling_compile", "true"]) == 2
    assert "--sampling_compile applies to the samples of --num_samples" in capsys.readouterr().err


def test_sample_reports_its_sampling_settings_and_a_vae_refuses_them(tiny_model_folder, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    argv = ["sample", str(tiny_model_folder), "--num_images", "2", "--steps", "2", "--out", str(grid)]
    assert main([*argv, "--sampling_precision", "fp32", "--sampling_compile", "false"]) == 0
    assert "note: sampling network: fp32, compile off as asked" in capsys.readouterr().err
    vae_folder = tmp_path / "vae"
    tiny_vae_pipeline().save_pretrained(vae_folder)
    assert main(["sample", str(vae_folder), "--out", str(grid), "--overwrite", "--sampling_precision", "bf16"]) == 2
    assert "--sampling_precision does not apply to" in capsys.readouterr().err


@pytest.mark.compile
def test_compiled_sampling_gives_the_eager_numbers():
    network, x, t = network_and_input()
    with torch.no_grad():
        reference = network(x, t).sample
        with sped_up_network(network, SamplingSpeedup("fp32", False, True, "")):
            compiled = network(x, t).sample
            again = network(x, t).sample
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(compiled, again) and "forward" not in vars(network)


def test_evaluate_json_holds_the_sampling_settings_and_seconds(monkeypatch, tmp_path):
    """With MNIST-shaped samples, sample_quality's result names the settings the samples were drawn with."""
    from hf_ddpm import DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler

    torch.manual_seed(0)
    unet = DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())
    folder = tmp_path / "mnist-shaped"
    scheduler = HFDDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    HFDDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    monkeypatch.setattr(sampling_speedup, "cpu_has_native_bf16", lambda: True)
    out = tmp_path / "result.json"
    argv = ["evaluate", str(folder), "--data", "embedded", "--max_images", "8", "--num_samples", "4"]
    assert main([*argv, "--steps", "2", "--sampling_compile", "false", "--json", str(out)]) == 0
    sampling = json.loads(out.read_text())["sample_quality"]["sampling"]
    assert sampling["precision"] == "bf16" and sampling["compiled"] is False and sampling["seconds"] > 0
