"""train.py --posthoc_ema end to end (tiny model, real MNIST digits): snapshots, the choice on the held-out bound, the
saved weights, resume; and the flag checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_TRAIN  # first: it makes training/train.py importable
from hf_ddpm.posthoc_ema import list_posthoc_snapshots, reconstruct_posthoc_ema

POSTHOC = ["--posthoc_ema", "--posthoc_ema_snapshots", "2", "--posthoc_ema_candidates", "0.05", "0.2"]
import train  # noqa: E402  (importable through helpers)


def run(output_dir: Path, *flags: str) -> Path:
    return train.main(["--output_dir", str(output_dir), *TINY_TRAIN, *POSTHOC, *flags])


def unet_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_the_pipeline_gets_the_reconstructed_ema_with_the_best_held_out_bound(tmp_path):
    out = run(tmp_path / "run", "--max_train_steps", "4", "--no_use_ema")
    snapshots = list_posthoc_snapshots(out / "posthoc_ema")
    assert [(s.step, s.sigma_rel) for s in snapshots] == [(2, 0.05), (2, 0.1), (4, 0.05), (4, 0.1)]
    results = json.loads((out / "eval_results.json").read_text())
    scores = results["posthoc_ema"]["held_out_bits_per_dim"]
    assert set(scores) == {"sigma_rel 0.05", "sigma_rel 0.2"}  # no --use_ema EMA to compare with
    chosen = results["posthoc_ema"]["chosen"]
    assert scores[chosen] == min(scores.values())
    # the saved network is that reconstruction, and its reported bound is the one it was chosen by (the same draws)
    expected = reconstruct_posthoc_ema(out / "posthoc_ema", float(chosen.split()[-1]))
    saved = unet_weights(out)
    assert saved.keys() == expected.keys()
    for name in saved:
        assert torch.equal(saved[name], expected[name]), name
    assert results["nll"]["bits_per_dim"] == scores[chosen]
    assert scores["sigma_rel 0.05"] != scores["sigma_rel 0.2"]  # two EMA lengths, two networks


def test_the_use_ema_weights_compete_and_a_resumed_run_rewrites_the_snapshots_it_retrains(tmp_path):
    straight = run(tmp_path / "straight", "--max_train_steps", "4", "--checkpointing_steps", "2")
    scores = json.loads((straight / "eval_results.json").read_text())["posthoc_ema"]["held_out_bits_per_dim"]
    assert "use_ema" in scores
    interrupted = tmp_path / "interrupted"
    run(interrupted, "--max_train_steps", "4", "--checkpointing_steps", "2")
    for name in ("checkpoint-4", "unet", "scheduler", "model_index.json"):  # as if the run had died after step 2
        subprocess.run(["rm", "-rf", str(interrupted / name)], check=True)
    stale = interrupted / "posthoc_ema" / "step-000004_sigma-0.050.safetensors"
    stale.write_bytes(b"not the resumed run's")
    run(interrupted, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    resumed = list_posthoc_snapshots(interrupted / "posthoc_ema")
    assert len(resumed) == 4
    for a, b in zip(list_posthoc_snapshots(straight / "posthoc_ema"), resumed):
        assert (a.step, a.sigma_rel) == (b.step, b.sigma_rel)
        x, y = load_file(str(a.path)), load_file(str(b.path))
        assert all(torch.equal(x[k], y[k]) for k in x), a.path.name
    assert unet_weights(straight).keys() == unet_weights(interrupted).keys()
    for name, tensor in unet_weights(straight).items():
        assert torch.equal(tensor, unet_weights(interrupted)[name]), name


def test_a_resume_with_another_posthoc_ema_setting_is_refused(tmp_path):
    out = run(tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "1")
    with pytest.raises(SystemExit, match=r"posthoc_ema: True -> False"):
        train.main(
            ["--output_dir", str(out), *TINY_TRAIN, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--posthoc_ema_candidates", "0.05", "0.3"],
            r"must be EMA lengths sigma_rel in \(0, 0.2887\), got \[0.05, 0.3\]",
        ),
        (["--posthoc_ema_snapshots", "1"], "--posthoc_ema_snapshots must be >= 2, got 1."),
    ],
)
def test_posthoc_ema_settings_that_cannot_be_reconstructed_are_refused(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path / "bad", "--max_train_steps", "1", *flags)


def test_a_config_file_gives_the_candidates_as_a_list_of_numbers(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("posthoc_ema: true\nposthoc_ema_candidates: [0.04, 0.1]\n")
    _, _, train_args = train.parse_arguments(["--config", str(config)])
    assert train_args.posthoc_ema and train_args.posthoc_ema_candidates == [0.04, 0.1]
    config.write_text("posthoc_ema_candidates: [0.04, true]\n")
    with pytest.raises(SystemExit, match=r"posthoc_ema_candidates must be a list of numbers, got \[0.04, True\]"):
        train.parse_arguments(["--config", str(config)])


def test_the_benchmark_reads_the_use_ema_weights_of_the_last_checkpoint(tmp_path, monkeypatch):
    # benchmarks/posthoc_ema.py scores --use_ema's EMA from the run's last checkpoint: in a run without
    # --posthoc_ema those are the weights the pipeline was saved with
    out = train.main(["--output_dir", str(tmp_path / "run"), *TINY_TRAIN, "--max_train_steps", "3"])
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from hf_ddpm.pipelines.auto import load_pipeline
    from posthoc_ema import use_ema_weights

    network = load_pipeline(str(out)).unet
    weights, saved = use_ema_weights(out, network), unet_weights(out)
    assert weights.keys() == saved.keys()
    for name in saved:
        assert torch.equal(weights[name], saved[name]), name
    trained = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(trained[name], saved[name]) for name in saved)  # the EMA, not the trained weights


def test_the_benchmark_bounds_the_first_images_and_scores_samples_against_all(monkeypatch):
    # --num_bound_images N: the bound on the first N held-out digits, the samples still against every one of them
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import contextlib
    import types

    import posthoc_ema

    seen = {}

    def bound(pipeline, images, options, generator):
        seen["bound"] = images
        return types.SimpleNamespace(to_dict=dict)

    def quality(samples, reference):
        seen["reference"] = reference
        return types.SimpleNamespace(frechet_distance=1.0, mean_confidence=0.5, class_kl_from_uniform=0.0)

    monkeypatch.setattr(posthoc_ema, "evaluate_bound", bound)
    monkeypatch.setattr(posthoc_ema, "sample_quality", quality)
    monkeypatch.setattr(posthoc_ema, "fast_sampling", lambda *a: contextlib.nullcontext(types.SimpleNamespace()))
    images = torch.rand(10, 1, 28, 28)

    def pipeline(batch_size, num_inference_steps, generator, output_type):
        return types.SimpleNamespace(images=torch.rand(batch_size, 1, 28, 28))

    posthoc_ema.score(pipeline, images, 4, seeds=[0], num_samples=3, steps=2)
    assert torch.equal(seen["bound"], images[:4]) and torch.equal(seen["reference"], images)


@pytest.mark.parametrize("count", ["0", "-5"])
def test_the_benchmark_refuses_a_bound_on_no_images_before_loading_the_run(tmp_path, monkeypatch, capsys, count):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import posthoc_ema

    monkeypatch.setattr(sys, "argv", ["posthoc_ema.py", str(tmp_path / "no_run"), "--num_bound_images", count])
    with pytest.raises(SystemExit):
        posthoc_ema.main()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"--num_bound_images must be >= 1 (or left out for all t10k), got {count}")
