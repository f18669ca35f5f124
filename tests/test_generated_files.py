"""Generated files are safe and never clobber; every flag applies or is refused; weights are 0644 (issue #30).

--export_space encodes every value a user gives (Python literals in app.py, YAML by a dumper in README.md) after
validating the repo id with huggingface_hub's validator, and replaces no file without --overwrite; ``hf_ddpm
sample --out`` replaces no image without --overwrite; sample and evaluate refuse flags that do nothing for the model
kind; train.py refuses bad push settings before training; every safetensors file written is 0644 under umask 022."""

from __future__ import annotations

import argparse
import os
import stat

import pytest
import yaml

from helpers import TINY_TRAIN, tiny_ddpm_pipeline, tiny_vae_pipeline, tiny_vdm_pipeline
from hf_ddpm import demo, training_args
from hf_ddpm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
HOSTILE = 'a/b"""; import pathlib; pathlib.Path("MARKER").write_text("ran"); """'

import train  # noqa: E402  (importable through helpers)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, make in (("ddpm", tiny_ddpm_pipeline), ("vae", tiny_vae_pipeline), ("vdm", tiny_vdm_pipeline)):
        make().save_pretrained(root / name)
    return root


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.strip() and "Loading pipeline components" not in line]
    assert len(lines) == 1, lines
    return lines[0]


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_hostile_repo_id_is_refused_before_any_file_is_written(tmp_path, capsys):
    space = tmp_path / "space"
    assert demo.run_demo(demo_args(HOSTILE.replace("MARKER", str(tmp_path / "x")), "--export_space", str(space))) == 2
    err = capsys.readouterr().err
    assert err.startswith('hf_ddpm: error: the model \'a/b"""; import pathlib;') and "is not a Hub repo id" in err
    assert len(err.strip().splitlines()) == 1 and not space.exists()


def test_a_revision_is_written_as_a_literal_and_the_readme_as_yaml(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    revision = f'main"""; import pathlib; pathlib.Path({str(marker)!r}).write_text("ran"); """'
    space = tmp_path / "space"
    demo.export_space("org/ddpm-mnist", space, revision=revision)
    loaded = []
    monkeypatch.setattr(demo, "build_demo", lambda pipeline: pipeline)
    monkeypatch.setattr(demo, "load_for_demo", lambda model, revision: loaded.append((model, revision)))
    exec(compile((space / "app.py").read_text(), "app.py", "exec"), {"__name__": "space_app"})
    assert loaded == [("org/ddpm-mnist", revision)] and not marker.exists()  # the revision arrived as data
    front = (space / "README.md").read_text().split("---\n")[1]
    assert yaml.safe_load(front) == {
        "title": "ddpm-mnist",
        "sdk": "gradio",
        "sdk_version": demo.import_gradio().__version__,
        "app_file": "app.py",
        "models": ["org/ddpm-mnist"],
        "pinned": False,
    }


def test_export_space_replaces_nothing_without_overwrite(tmp_path, capsys):
    space = tmp_path / "space"
    space.mkdir()
    (space / "app.py").write_text("mine")
    assert demo.run_demo(demo_args("org/model", "--export_space", str(space))) == 2
    assert capsys.readouterr().err == (
        f"hf_ddpm: error: --export_space {space} already has app.py; pass --overwrite to replace them, or choose "
        "another folder.\n"
    )
    assert (space / "app.py").read_text() == "mine" and sorted(p.name for p in space.iterdir()) == ["app.py"]
    assert demo.run_demo(demo_args("org/model", "--export_space", str(space), "--overwrite")) == 0
    assert "'org/model'" in (space / "app.py").read_text()


def test_sample_replaces_no_image_without_overwrite(models, tmp_path, capsys):
    out = tmp_path / "pngs"
    out.mkdir()
    (out / "00001.png").write_bytes(b"mine")
    argv = ["sample", str(models / "ddpm"), "--out", str(out), "--num_images", "2", "--steps", "2"]
    assert one_line(capsys, argv) == (
        f"hf_ddpm: error: --out {out}: 00001.png already exist(s); pass --overwrite to replace, or choose another "
        "--out."
    )
    assert (out / "00001.png").read_bytes() == b"mine" and not (out / "00000.png").exists()
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"mine")
    line = one_line(capsys, ["sample", str(models / "ddpm"), "--out", str(grid), "--steps", "2"])
    assert line.endswith("grid.png already exist(s); pass --overwrite to replace, or choose another --out.")
    assert main([*argv, "--overwrite"]) == 0 and (out / "00001.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "kind, argv, message",
    [
        ("vae", ["evaluate", "--exact"], "--exact does not apply to {model}, a VAEPipeline; drop it."),
        ("vae", ["evaluate", "--steps", "3"], "--steps does not apply to {model}, a VAEPipeline; drop it."),
        ("vae", ["evaluate", "--no_clip_denoised"], "--no_clip_denoised does not apply to {model}, a VAEPipeline"),
        ("vae", ["evaluate", "--timesteps_per_image=3"], "--timesteps_per_image does not apply to {model}, a VAE"),
        ("ddpm", ["evaluate", "--elbo_samples", "5"], "--elbo_samples does not apply to {model}, a HFDDPMPipeline"),
        ("vdm", ["evaluate", "--iwae_samples", "7"], "--iwae_samples does not apply to {model}, a VDMPipeline"),
        ("vae", ["sample", "--scheduler", "ddim"], "--scheduler does not apply to {model}, a VAEPipeline; drop it."),
        ("vae", ["sample", "--steps", "7"], "--steps does not apply to {model}, a VAEPipeline; drop it."),
        (
            "ddpm",
            ["evaluate", "--exact", "--timesteps_per_image", "3"],
            "--timesteps_per_image does not apply with --exact, which sums every timestep; drop one.",
        ),
        (
            "vdm",
            ["evaluate", "--timesteps_per_image", "1"],
            "--timesteps_per_image must be >= 2 for a VDMPipeline (the standard error of its estimated bound needs "
            "two draws per image), got 1.",
        ),
    ],
)
def test_a_flag_that_does_not_apply_is_refused_before_the_data(models, tmp_path, capsys, kind, argv, message):
    model = str(models / kind)
    extra = ["--data", str(tmp_path / "no-such-data")] if argv[0] == "evaluate" else ["--out", str(tmp_path / "s")]
    line = one_line(capsys, [argv[0], model, *argv[1:], *extra])
    assert line.startswith("hf_ddpm: error: " + message.format(model=model))
    assert not (tmp_path / "s").exists()


def test_every_safetensors_file_written_is_0644_under_umask_022(models, tmp_path):
    umask = os.umask(0o022)
    try:
        tiny_ddpm_pipeline().save_pretrained(tmp_path / "saved")
        out = tmp_path / "run"
        train.main(["--output_dir", str(out), *TINY_TRAIN, "--max_train_steps", "1"])
    finally:
        os.umask(umask)
    written = [*(tmp_path / "saved").rglob("*.safetensors"), *out.rglob("*.safetensors")]
    assert {p.relative_to(tmp_path).as_posix() for p in written} >= {
        "saved/unet/diffusion_pytorch_model.safetensors",
        "run/checkpoint-1/model.safetensors",
        "run/unet/diffusion_pytorch_model.safetensors",
    }
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--push_to_hub", "--hub_model_id", "../../etc"],
            "error: --hub_model_id '../../etc' is not a Hub repo id ORG/NAME: Repo id must be in the form",
        ),
        (["--hub_private_repo"], "error: --hub_private_repo applies to a push: add --push_to_hub --hub_model_id"),
        (["--push_checkpoints"], "error: --push_checkpoints applies to a push: add --push_to_hub --hub_model_id"),
    ],
)
def test_push_settings_are_refused_before_training(tmp_path, capsys, flags, message):
    assert training_args.run_cli(train.main, ["--output_dir", str(tmp_path / "out"), *TINY_TRAIN, *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "out").exists()


def test_a_push_without_a_token_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-cache" / "token"))
    push = ["--push_to_hub", "--hub_model_id", "org/ddpm-mnist"]
    argv = ["--output_dir", str(tmp_path / "out"), *TINY_TRAIN, *push]
    assert training_args.run_cli(train.main, argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --push_to_hub needs a Hub token and none was found: pass --hub_token, set HF_TOKEN or log in with hf "
        "auth login."
    ]
    assert not (tmp_path / "out").exists()
    assert training_args.parse_arguments([*argv, "--hub_token", "hf_given"])[2].hub_token == "hf_given"
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    assert training_args.parse_arguments(argv)[2].push_to_hub
