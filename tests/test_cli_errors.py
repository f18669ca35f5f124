"""The hf_ddpm command line fails fast in one line (issue #14): bad counts and unwritable outputs are refused
before any sampling or bound, the sample-quality metrics refuse a model that is not 1x28x28, and a grid can be any
image format PIL writes."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from hf_ddpm import DenoisingUNet, GaussianVAE, HFDDPMPipeline, HFDDPMScheduler, VAEPipeline
from hf_ddpm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    unet = DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())
    folder = tmp_path_factory.mktemp("model")
    scheduler = HFDDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    HFDDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    torch.manual_seed(0)
    unet = DenoisingUNet(sample_size=8, in_channels=3, block_out_channels=(8, 16), attention_resolutions=())
    folder = tmp_path_factory.mktemp("rgb")
    scheduler = HFDDPMScheduler(num_train_timesteps=20, variance_type="learned_range")
    HFDDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def one_line(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    captured = capsys.readouterr()
    # diffusers' "Loading pipeline components" progress bar may come first; then exactly one line, no traceback
    lines = [line for line in captured.err.strip().splitlines() if not line.startswith("Loading pipeline components")]
    assert len(lines) == 1 and lines[0].startswith("hf_ddpm: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_images", "-1"], "hf_ddpm: error: --num_images must be >= 1, got -1."),
        (["--num_images", "0"], "hf_ddpm: error: --num_images must be >= 1, got 0."),
        (["--batch_size", "0"], "hf_ddpm: error: --batch_size must be >= 1, got 0."),
        (["--steps", "0"], "hf_ddpm: error: --steps must be >= 1, got 0."),
    ],
)
def test_sample_refuses_bad_counts(tiny_model, capsys, flags, message):
    assert one_line(capsys, ["sample", str(tiny_model), *flags]) == message


def test_sample_refuses_an_unwritable_out_before_sampling(tiny_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(HFDDPMPipeline, "__call__", lambda *a, **k: pytest.fail("sampled before checking --out"))
    out = tmp_path / "file" / "grid.png"
    line = one_line(capsys, ["sample", str(tiny_model), "--num_images", "1", "--out", str(out)])
    assert line == f"hf_ddpm: error: --out {out}: {tmp_path / 'file'} is not a writable folder; choose another path."
    line = one_line(capsys, ["sample", str(tiny_model), "--num_images", "1", "--out", str(tmp_path / "file")])
    assert "is a file without an image suffix" in line


def test_sample_writes_a_jpeg_grid_for_a_jpg_out_and_a_folder_without_a_suffix(tiny_model, tmp_path):
    grid_path = tmp_path / "grid.jpg"
    assert main(["sample", str(tiny_model), "--num_images", "4", "--steps", "2", "--out", str(grid_path)]) == 0
    with PIL.Image.open(tmp_path / "grid.jpg") as grid:
        assert grid.format == "JPEG" and grid.size == (56, 56)
    assert main(["sample", str(tiny_model), "--num_images", "2", "--steps", "2", "--out", str(tmp_path / "many")]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["00000.png", "00001.png"]


def test_evaluate_refuses_bad_counts_before_the_bound(tiny_model, capsys):
    line = one_line(capsys, ["evaluate", str(tiny_model), "--data", "embedded", "--timesteps_per_image", "0"])
    assert line == "hf_ddpm: error: --timesteps_per_image must be >= 1, got 0."


@pytest.mark.parametrize(
    "flags",
    [["--num_samples", "1"], ["--num_samples", "8", "--max_images", "1"]],
)
def test_evaluate_refuses_sample_metrics_of_fewer_than_two_images_before_the_bound(tiny_model, capsys, flags):
    line = one_line(capsys, ["evaluate", str(tiny_model), "--data", "embedded", *flags])
    count, images = flags[1], flags[3] if len(flags) > 2 else "None"
    assert line == (
        f"hf_ddpm: error: --num_samples {count} with --max_images {images}: the sample metrics compare two "
        "covariances, of at least 2 samples and 2 images: raise both, or drop --num_samples."
    )


def test_sample_quality_refuses_a_model_not_1x28x28_before_the_bound(rgb_model, tmp_path, capsys, monkeypatch):
    import hf_ddpm.cli

    monkeypatch.setattr(hf_ddpm.cli, "evaluate_bound", lambda *a, **k: pytest.fail("computed the bound first"))
    line = one_line(
        capsys,
        [
            "evaluate",
            str(rgb_model),
            "--data",
            "embedded",
            "--max_images",
            "4",
            "--num_samples",
            "4",
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert "the sample-quality metrics use an MNIST classifier of 1x28x28 digits" in line
    assert "makes 3x8x8 images; drop --num_samples to evaluate the bound only." in line


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope" / "model")
    line = one_line(capsys, ["sample", missing, "--num_images", "1", "--out", str(tmp_path / "g.png")])
    assert "no such folder" in line and "Repo id must be" not in line


def test_debug_keeps_the_traceback(tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("HF_DDPM_DEBUG", "1")
    assert main(["sample", str(tiny_model), "--num_images", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "hf_ddpm: error: --num_images must be >= 1, got 0."


def test_a_vae_folder_given_to_the_diffusion_pipeline_says_which_class_to_use(tmp_path):
    VAEPipeline(GaussianVAE(latent_dim=4, block_out_channels=(8, 8), hidden_dim=8)).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError) as error:
        HFDDPMPipeline.from_pretrained(tmp_path / "vae")
    assert str(error.value) == (
        f"{tmp_path / 'vae'} holds a VAEPipeline, not a HFDDPMPipeline: load it with VAEPipeline.from_pretrained "
        "(from hf_ddpm import VAEPipeline)."
    )


def test_version_prints_the_installed_version(capsys):
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf_ddpm {importlib.metadata.version('hf_ddpm')}"


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_at_endpoint(tmp_path, endpoint: str, *argv: str) -> str:
    """The one stderr line of ``hf_ddpm ARGV`` run in a fresh process whose Hub is ``endpoint`` (huggingface_hub
    reads HF_ENDPOINT at import), with an empty cache; asserts exit code 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-c", "import sys; from hf_ddpm.cli import main; sys.exit(main())", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_an_unreachable_hub_is_one_line_naming_the_endpoint(tmp_path, command):
    endpoint = f"http://127.0.0.1:{free_port()}"
    extra = ["--data", "embedded"] if command == "evaluate" else ["--out", str(tmp_path / "g.png")]
    line = cli_at_endpoint(tmp_path, endpoint, command, "org/ddpm-mnist", *extra)
    assert line.startswith(f"hf_ddpm: error: could not reach the Hub at {endpoint} to load org/ddpm-mnist (")
    assert "not in the local cache; check the network and HF_ENDPOINT, or give a local folder." in line
    assert "refused" in line.lower()  # it reached for the closed local port, nothing else


def test_a_repo_the_hub_does_not_have_is_one_line(tmp_path):
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # what the Hub answers for a repo it does not have
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        line = cli_at_endpoint(tmp_path, endpoint, "sample", "org/no-such-model", "--out", str(tmp_path / "g.png"))
    finally:
        server.shutdown()
    assert line == (
        f"hf_ddpm: error: no such repo org/no-such-model on the Hub at {endpoint} (or it is private: log in with hf "
        "auth login or set HF_TOKEN); a local model is a folder that exists."
    )


@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"], ["sample", "--help"], ["demo", "--help"]])
def test_help_shows_defaults_and_choices_and_no_development_markup(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "``" not in text and "../shared" not in text and ":func:" not in text
    if argv[0] == "sample":
        assert "--scheduler {vdm,ddpm,ddim,dpm}" in text and "(default: vdm)" in text
    if argv[0] in ("evaluate", "sample"):
        assert "(default: 256)" in text and "(default: 100)" in text
    if argv[0] == "demo":
        assert "(default: 7860)" in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ode_rtol", "1e-3"], "--ode_rtol applies only to --estimator ode; drop it."),
        (["--estimator", "ode", "--exact"], "--exact applies only to the bound (--estimator bound); drop it."),
        (["--estimator", "ode", "--timesteps_per_image", "4"], "--timesteps_per_image applies only to the bound"),
    ],
)
def test_evaluate_refuses_the_flags_of_the_other_estimator_before_the_data(
    tiny_model, tmp_path, capsys, flags, message
):
    absent = str(tmp_path / "no_such_data")  # refused before the data is looked at
    assert message in one_line(capsys, ["evaluate", str(tiny_model), "--data", absent, *flags])
