"""Autoguidance: the guided output's closed form, HFDDPMPipeline with a guide_unet (sampling, saving, loading,
refusals), the guide a training run keeps (its step, its weights, resume) and the CLI's --guidance_scale."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_TRAIN, tiny_ddpm_pipeline  # first: it makes training/train.py importable
from hf_ddpm import DenoisingUNet, HFDDPMPipeline
from hf_ddpm.cli import main as cli_main
from hf_ddpm.ddpm.guidance import autoguided_output, check_guidance_scale
from hf_ddpm.guide_snapshot import GuideSnapshot, guide_step
from hf_ddpm.sampling_speedup import fast_sampling
from hf_ddpm.training_budget import decay_start_step
from hf_ddpm.training_utils import CHECKPOINT_ARGS

pytestmark = pytest.mark.usefixtures("one_thread")
import train  # noqa: E402  (importable through helpers)


def guided_pipeline(guidance_scale: float = 2.0) -> HFDDPMPipeline:
    """The tiny DDPM of helpers (seed 0) with the same network of seed 1 as its guide."""
    pipeline = tiny_ddpm_pipeline(0)
    guided = HFDDPMPipeline(
        unet=pipeline.unet,
        scheduler=pipeline.scheduler,
        guide_unet=tiny_ddpm_pipeline(1).unet,
        guidance_scale=guidance_scale,
    )
    guided.set_progress_bar_config(disable=True)
    return guided


def draw(pipeline: HFDDPMPipeline, **call) -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    return pipeline(batch_size=3, num_inference_steps=10, generator=generator, output_type="pt", **call).images


# ---------------------------------------------------------------------------------------------- the equation
def test_the_guided_prediction_extrapolates_from_the_guide_and_keeps_the_models_variance():
    generator = torch.Generator().manual_seed(0)
    model, guide = torch.randn(2, 4, 3, 3, generator=generator), torch.randn(2, 4, 3, 3, generator=generator)
    for w in (0.0, 1.0, 2.0, 3.5):
        out = autoguided_output(model, guide, w, channels=2)
        torch.testing.assert_close(out[:, :2], guide[:, :2] + w * (model[:, :2] - guide[:, :2]))
        assert torch.equal(out[:, 2:], model[:, 2:])  # the learned variance is the model's own
    assert torch.equal(autoguided_output(model, guide, 1.0, channels=2), model)
    with pytest.raises(ValueError, match="same network"):
        autoguided_output(model, guide[:, :2], 2.0, channels=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "2"])
def test_a_guidance_scale_must_be_a_finite_number(bad):
    with pytest.raises(ValueError, match="finite number"):
        check_guidance_scale(bad)


# ---------------------------------------------------------------------------------------------- the pipeline
def test_guided_sampling_is_the_chain_of_the_guided_outputs_and_scale_one_is_the_model_alone():
    guided = guided_pipeline(2.0)
    plain = tiny_ddpm_pipeline(0)
    assert torch.equal(draw(guided, guidance_scale=1.0), draw(plain))
    images = draw(guided)  # the pipeline's own default, 2
    assert (images - draw(plain)).abs().max() > 1e-3
    # the same chain stepped by hand with the guided output
    scheduler, generator = guided.scheduler, torch.Generator().manual_seed(4)
    x = torch.randn(3, 1, 8, 8, generator=generator)
    scheduler.set_timesteps(10)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = autoguided_output(guided.unet(x, t).sample, guided.guide_unet(x, t).sample, 2.0, channels=1)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    torch.testing.assert_close(images, (x.clamp(-1, 1) + 1) / 2, rtol=0, atol=1e-6)
    assert torch.equal(draw(guided, guidance_scale=3.0), draw(guided_pipeline(3.0)))


def test_a_guided_pipeline_saves_and_loads_its_guide_and_scale(tmp_path):
    guided = guided_pipeline(2.5)
    guided.save_pretrained(tmp_path / "guided")
    index = json.loads((tmp_path / "guided" / "model_index.json").read_text())
    assert index["guidance_scale"] == 2.5 and index["guide_unet"] == ["hf_ddpm", "DenoisingUNet"]
    loaded = HFDDPMPipeline.from_pretrained(tmp_path / "guided")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.guidance_scale == 2.5
    assert torch.equal(draw(loaded), draw(guided))
    # a folder written before autoguidance (no key, no guide) loads unguided
    plain = tiny_ddpm_pipeline(0)
    plain.save_pretrained(tmp_path / "plain")
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    (tmp_path / "plain" / "model_index.json").write_text(
        json.dumps({k: v for k, v in index.items() if k not in ("guidance_scale", "guide_unet")})
    )
    old = HFDDPMPipeline.from_pretrained(tmp_path / "plain")
    assert old.guide_unet is None and old.config.guidance_scale == 1.0


def test_guidance_without_a_guide_or_with_another_network_is_refused_in_one_line():
    plain = tiny_ddpm_pipeline(0)
    with pytest.raises(ValueError, match="needs a guide_unet"):
        draw(plain, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs a guide_unet"):
        HFDDPMPipeline(unet=plain.unet, scheduler=plain.scheduler, guidance_scale=2.0)
    other = DenoisingUNet(sample_size=8, block_out_channels=(8, 8), attention_resolutions=(), learn_variance=True)
    with pytest.raises(ValueError, match="same network as unet"):
        HFDDPMPipeline(unet=plain.unet, scheduler=plain.scheduler, guide_unet=other, guidance_scale=2.0)


def test_fast_sampling_speeds_up_the_guide_too_and_restores_both():
    guided = guided_pipeline(2.0)
    with fast_sampling(guided, 30, precision="fp32", compile=False) as speedup:
        assert speedup.channels_last
        assert "forward" in vars(guided.unet) and "forward" in vars(guided.guide_unet)
    assert "forward" not in vars(guided.unet) and "forward" not in vars(guided.guide_unet)


# ---------------------------------------------------------------------------------------------- training
def test_the_guide_step_is_a_decay_start_and_comes_after_a_late_decision():
    assert [guide_step(n, 0.6) for n in (1, 2, 10, 8772)] == [1, 1, 6, 5263]
    assert guide_step(8772, 0.6) == decay_start_step(8772, 0.4)  # where the cpu recipe's decay starts
    assert all(guide_step(n, 1.0) == n for n in (1, 7, 100))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="guide_fraction"):
            guide_step(10, bad)


def test_a_guide_snapshot_keeps_a_copy_and_round_trips_its_state():
    unet = tiny_ddpm_pipeline(0).unet
    snapshot = GuideSnapshot(0.5)
    assert snapshot.due(5, 10) and snapshot.due(6, 10) and not snapshot.due(4, 10)
    assert not snapshot.due(5, 12) and snapshot.due(5, 9)  # the steps still an estimate: reached once passed
    assert GuideSnapshot(0.5, fixed_step=3).due(3, 10) and not GuideSnapshot(0.5, fixed_step=3).due(2, 4)
    snapshot.take(unet, 5)
    with torch.no_grad():
        next(unet.parameters()).add_(1.0)  # training goes on: the copy must not follow
    restored = GuideSnapshot(0.9)
    restored.load_state_dict(snapshot.state_dict())
    guide = restored.network(unet)
    assert restored.step == 5 and not restored.due(5, 10) and guide is not unet
    assert not torch.equal(next(guide.parameters()), next(unet.parameters()))
    assert torch.equal(next(guide.parameters()) + 1.0, next(unet.parameters()))


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_a_run_saves_the_ema_of_its_guide_step_as_the_guide_and_resumes_it_bitwise(tmp_path):
    flags = [
        "--max_train_steps",
        "4",
        "--guidance_scale",
        "2",
        "--guide_fraction",
        "0.5",
        "--save_pipeline_steps",
        "2",
    ]
    out = train.main(["--output_dir", str(tmp_path / "run"), *TINY_TRAIN, *flags, "--checkpointing_steps", "3"])
    guide, at_2 = unet_weights(out / "guide_unet"), unet_weights(out / "pipeline-2" / "unet")
    assert guide.keys() == at_2.keys() and all(torch.equal(guide[k], at_2[k]) for k in guide)  # step 2 = 4 - 2
    assert not all(torch.equal(guide[k], v) for k, v in unet_weights(out / "unet").items())
    results = json.loads((out / "eval_results.json").read_text())
    assert results["autoguidance"] == {"guidance_scale": 2.0, "guide_step": 2}
    assert json.loads((out / "training_args.json").read_text())["guide_step"] == 2  # --config repeats the guide
    assert "autoguided by default" in (out / "README.md").read_text()
    loaded = HFDDPMPipeline.from_pretrained(out)
    assert loaded.config.guidance_scale == 2.0 and loaded.guide_unet is not None
    # resumed from step 3, after the guide's step: the guide comes from the checkpoint
    resumed = tmp_path / "resumed"
    train.main(["--output_dir", str(resumed), *TINY_TRAIN, *flags, "--checkpointing_steps", "3"])
    for name in ("checkpoint-4", "unet", "guide_unet", "scheduler"):
        shutil.rmtree(resumed / name)
    (resumed / "model_index.json").unlink()
    train.main(
        [
            "--output_dir",
            str(resumed),
            *TINY_TRAIN,
            *flags,
            "--checkpointing_steps",
            "3",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    for part in ("unet", "guide_unet"):
        a, b = unet_weights(out / part), unet_weights(resumed / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_guidance_scale_one_saves_no_guide(tmp_path):
    out = train.main(
        ["--output_dir", str(tmp_path / "run"), *TINY_TRAIN, "--max_train_steps", "2", "--guidance_scale", "1"]
    )
    assert not (out / "guide_unet").exists()
    assert json.loads((out / "model_index.json").read_text())["guidance_scale"] == 1.0
    assert "autoguidance" not in json.loads((out / "eval_results.json").read_text())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance_scale", "nan"], "finite number"),
        (["--guide_fraction", "0"], "--guide_fraction must be in"),
        (["--max_train_steps", "4", "--guide_step", "5"], "--guide_step must be a step of the run"),
        (["--guide_step", "0"], "--guide_step must be a step of the run"),
    ],
)
def test_autoguidance_flags_are_refused_in_one_line(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as error:
        train.main(["--output_dir", str(tmp_path / "run"), *TINY_TRAIN, *flags])
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------- the CLI
def test_the_cli_samples_with_the_pipelines_scale_or_the_one_given_and_refuses_it_without_a_guide(tmp_path, capsys):
    guided_pipeline(2.0).save_pretrained(tmp_path / "guided")
    tiny_ddpm_pipeline(0).save_pretrained(tmp_path / "plain")
    common = ["--num_images", "3", "--steps", "10", "--seed", "4", "--sampling_precision", "fp32"]
    common += ["--sampling_compile", "false"]

    def grid(model: str, name: str, *flags: str) -> np.ndarray:
        assert cli_main(["sample", str(tmp_path / model), *common, *flags, "--out", str(tmp_path / name)]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name))

    own, one, plain = (
        grid("guided", "own.png"),
        grid("guided", "one.png", "--guidance_scale", "1"),
        grid("plain", "p.png"),
    )
    assert np.array_equal(one, plain) and not np.array_equal(own, plain)
    code = cli_main(
        ["sample", str(tmp_path / "plain"), *common, "--guidance_scale", "2", "--out", str(tmp_path / "x.png")]
    )
    assert code != 0 and "needs a guide_unet" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_checkpoint_without_a_guide_resumes_only_unguided_and_says_so_in_one_line(tmp_path):
    """A checkpoint of a run saved before autoguidance (no guide in it, no key in its arguments) cannot give a guided
    run its guide: refused in one line, resumable with --guidance_scale 1."""
    out = tmp_path / "run"
    flags = [*TINY_TRAIN, "--max_train_steps", "3", "--checkpointing_steps", "2", "--guidance_scale", "1"]
    train.main(["--output_dir", str(out), *flags])
    for saved in (out / "checkpoint-2" / CHECKPOINT_ARGS, out / "training_args.json"):
        arguments = json.loads(saved.read_text())
        saved.write_text(json.dumps({k: v for k, v in arguments.items() if not k.startswith("guid")}))
    shutil.rmtree(out / "checkpoint-3")
    guided = [*flags[:-1], "2", "--resume_from_checkpoint", "latest"]
    with pytest.raises(SystemExit, match="does not fit this model") as error:
        train.main(["--output_dir", str(out), *guided])
    assert "\n" not in str(error.value)
    train.main(["--output_dir", str(out), *flags, "--resume_from_checkpoint", "latest"])
    assert (out / "model_index.json").is_file()


def test_the_benchmark_scores_a_guided_run_with_its_own_guide_and_without(tmp_path, monkeypatch):
    """benchmarks/autoguidance.py on an autoguided run, no --guides: the model alone (w = 1) and with its own
    guide_unet, each scoring the samples the pipeline draws itself with that w and the same seed."""
    flags = [*TINY_TRAIN, "--max_train_steps", "2", "--guidance_scale", "2"]
    out = train.main(["--output_dir", str(tmp_path / "run"), *flags])
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import autoguidance
    import posthoc_ema

    scored = []

    def quality(samples, reference):
        scored.append(samples)
        return types.SimpleNamespace(frechet_distance=1.0, mean_confidence=0.5, class_kl_from_uniform=0.0)

    monkeypatch.setattr(posthoc_ema, "sample_quality", quality)
    monkeypatch.setattr(posthoc_ema, "fast_sampling", lambda *a: contextlib.nullcontext(types.SimpleNamespace()))
    report = tmp_path / "report.json"
    argv = ["autoguidance.py", str(out), "--scales", "1", "2", "--num_samples", "3", "--steps", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(report)])
    autoguidance.main()
    arms = json.loads(report.read_text())["arms"]
    assert [(a["guide"], a["guidance_scale"]) for a in arms] == [("the model alone", 1.0), ("its own guide_unet", 2.0)]
    pipeline = HFDDPMPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    for samples, w in zip(scored, (1.0, 2.0)):
        generator = torch.Generator().manual_seed(0)
        call = dict(batch_size=3, num_inference_steps=2, generator=generator, output_type="pt", guidance_scale=w)
        assert torch.equal(samples, pipeline(**call).images * 2 - 1)
    assert not torch.equal(scored[0], scored[1])
