"""The model card (hf_ddpm.hub.card): metadata the Hub validates, the measured numbers as printed, no secrets."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from helpers import REPO, REPO_ROOT, TOKEN, bound_of, code_blocks, report_for, tiny_ddpm_pipeline, tiny_vae_pipeline
from hf_ddpm import (
    BoundOptions,
    DenoisingUNet,
    HFDDPMPipeline,
    HFDDPMScheduler,
    NLLResult,
    TrainingReport,
    evaluate_bound,
    render_model_card,
)
from hf_ddpm.cli import build_parser
from hf_ddpm.data import ImageTensorDataset, load_images
from hf_ddpm.hub.card import redact_secrets

pytestmark = pytest.mark.usefixtures("one_thread")


def table_rows(card_text: str) -> dict[str, str]:
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", card_text, flags=re.M))


def assert_printed(printed: str, value: float) -> None:
    """``printed`` is ``value`` rounded to the digits shown."""
    decimals = len(printed.split("e")[0].split(".")[1]) - (int(printed.split("e")[1]) if "e" in printed else 0)
    assert abs(float(printed) - value) <= 0.5 * 10.0**-decimals


def test_the_report_holds_the_bound_it_was_given():
    bound = report_for(tiny_ddpm_pipeline(0)).nll.bound
    assert bound.num_images == 2 and bound.standard_error == pytest.approx(0.0123456, rel=1e-12)
    assert bound.terms == pytest.approx(
        {"denoising": 1.0012345, "prior": 3.1415e-05, "reconstruction": 0.23330195}, rel=1e-15
    )
    assert bound.bits_per_dim == pytest.approx(1.0012345 + 3.1415e-05 + 0.23330195, rel=1e-15)


def test_card_metadata_validates_and_shows_the_measured_numbers(tmp_path):
    report = report_for(tiny_ddpm_pipeline(0))
    bound = report.nll.bound
    card = render_model_card(report)
    card.save(tmp_path / "README.md")

    metadata = metadata_load(tmp_path / "README.md")
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "unconditional-image-generation"
    assert {"pytorch", "diffusers", "unconditional-image-generation", "ddpm", "hf_ddpm"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["ylecun/mnist"] and metadata["license"] == "apache-2.0"
    model_name, results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == "ddpm-mnist"
    by_metric = {result.metric_type: result for result in results}
    assert set(by_metric) == {"nll", "nll_standard_error"}
    result = by_metric["nll"]
    assert (result.task_type, result.dataset_type, result.dataset_split, result.metric_type) == (
        "unconditional-image-generation",
        "ylecun/mnist",
        "train[4500:5000]",
        "nll",
    )
    assert result.metric_value == bound.bits_per_dim  # exactly: the metadata keeps every digit
    assert by_metric["nll_standard_error"].metric_value == bound.standard_error
    loaded = {r.metric_type: r.metric_value for r in ModelCard.load(tmp_path / "README.md").data.eval_results}
    assert loaded["nll"] == bound.bits_per_dim

    rows = table_rows(card.text)
    assert_printed(rows["NLL bound (bits/dim)"], bound.bits_per_dim)
    assert_printed(rows["standard error (bits/dim)"], bound.standard_error)
    for term, value in bound.terms.items():
        assert_printed(rows[term], value)
    assert "importance-weighted bound (bits/dim)" not in rows  # a DDPM has none
    assert "train[4500:5000], 2 images" in card.text and bound.estimator in card.text
    assert rows["optimizer steps"] == "1,500" and rows["images seen"] == "96,000"
    assert re.search(r"\((\d+) s\)", rows["wall time"]).group(1) == "723"
    assert rows["hardware"] == report.hardware
    assert rows["`learning_rate`"] == "0.001" and rows["`block_out_channels`"] == "[8, 16]"
    assert "hub_token" not in card.content and TOKEN not in card.content
    assert "![Samples from the model](samples.png)" in card.text
    hf_ddpm_snippet, remote_snippet = code_blocks(card.text)
    assert f'HFDDPMPipeline.from_pretrained("{REPO}", revision="main")' in hf_ddpm_snippet
    assert f'DiffusionPipeline.from_pretrained("{REPO}", trust_remote_code=True, revision="main")' in remote_snippet
    assert "custom_pipeline" not in remote_snippet  # one call, no argument to guess


def test_card_demo_commands_are_valid_hf_ddpm_commands_for_the_repo():
    card = render_model_card(TrainingReport.for_pipeline(tiny_vae_pipeline(0), REPO))
    [block] = re.findall(r"```bash\n(.*?)```", card.text, flags=re.S)
    commands = [shlex.split(line, comments=True) for line in block.strip().splitlines()]
    assert [command[:2] for command in commands] == [["hf_ddpm", "demo"]] * 2
    served, space = (build_parser().parse_args(command[1:]) for command in commands)
    assert (served.model, served.revision, served.export_space) == (REPO, "main", None)
    assert (space.model, space.revision, space.export_space) == (REPO, "main", "space/")


def test_card_of_a_vae_shows_its_importance_weighted_bound():
    pipeline = tiny_vae_pipeline(0)
    bound = bound_of(
        {"reconstruction": 0.9, "kl": 0.1}, standard_error=0.02, estimator="ELBO with 1 sample(s) of z; IWAE with K=64"
    )
    bound.per_image_iwae = bound.per_image - 0.05
    report = TrainingReport.for_pipeline(
        pipeline, "org/vae-mnist", nll=NLLResult(bound, "ylecun/mnist", "MNIST", "test")
    )
    card = render_model_card(report)
    rows = table_rows(card.text)
    iwae, iwae_error = rows["importance-weighted bound (bits/dim)"].split(" ± ")
    assert_printed(iwae, bound.to_dict()["iwae_bits_per_dim"])
    assert_printed(iwae_error, bound.to_dict()["iwae_standard_error"])
    assert "vae" in ModelCard(str(card)).data.tags and "`GaussianVAE`" in card.text
    hf_ddpm_snippet, _ = code_blocks(card.text)
    assert 'VAEPipeline.from_pretrained("org/vae-mnist", revision="main")' in hf_ddpm_snippet


def test_card_of_a_pipeline_alone_has_no_results_and_validates():
    card = render_model_card(TrainingReport.for_pipeline(tiny_ddpm_pipeline(0), REPO, sample_grid=None))
    parsed = ModelCard(str(card))
    assert parsed.data.eval_results is None and "model-index" not in card.content
    assert "No likelihood was evaluated" in card.text and "![" not in card.text
    assert "`DenoisingUNet`" in card.text  # the description and components come from the pipeline


def test_secrets_are_dropped_by_key_and_by_value():
    arguments = {
        "hub_token": "x",
        "api_key": "y",
        "tokenizer_name": "t5",
        "max_tokens": 3,
        "url": f"https://u:{TOKEN}@h",
        "nested": {"password": "p", "lr": 1},
    }
    assert redact_secrets(arguments, TOKEN) == {"tokenizer_name": "t5", "max_tokens": 3, "nested": {"lr": 1}}


def test_card_shows_each_plot_with_its_caption_after_the_sample_grid():
    plots = {"loss_curve.png": "The training loss", "bound_by_time.png": "Where the bits go"}
    text = str(render_model_card(report_for(tiny_ddpm_pipeline(0), plots=plots)))
    results = text[text.index("## Results") :]
    grid = results.index("![Samples from the model](samples.png)")
    for path, caption in plots.items():
        assert f"![{caption}]({path})" in results and f"*{caption}*" in results
        assert results.index(f"]({path})") > grid
    assert "loss_curve.png" not in str(render_model_card(report_for(tiny_ddpm_pipeline(0))))


def test_the_example_of_model_cards_readme_runs_and_reports_its_bound():
    """Every Python block of model_cards/README.md, run with the two names its text says it takes: the card it
    renders reports the bound that evaluate_bound gives for those digits."""
    text = (REPO_ROOT / "model_cards" / "README.md").read_text(encoding="utf-8")
    blocks = code_blocks(text)
    assert blocks and "NLLResult(" in blocks[0]
    torch.manual_seed(0)
    unet = DenoisingUNet(block_out_channels=(8, 16), attention_resolutions=())  # 28x28, as the example's digits
    scheduler = HFDDPMScheduler(num_train_timesteps=10, variance_type="learned_range")
    pipeline = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    namespace = {"pipeline": pipeline, "resolved_arguments": {"learning_rate": 1e-3, "hub_token": TOKEN}}
    torch.manual_seed(1)  # the example's evaluate_bound draws its timesteps and noise from the global generator
    for block in blocks:
        exec(compile(block, "model_cards/README.md", "exec"), namespace)
    card, bound = namespace["card"], namespace["bound"]
    digits = ImageTensorDataset(load_images(split="test", max_images=64).images)[:]
    torch.manual_seed(1)
    expected = evaluate_bound(pipeline, digits, BoundOptions(timesteps_per_image=8))
    assert bound.num_images == 64 and bound.bits_per_dim == expected.bits_per_dim
    by_metric = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert by_metric["nll"] == expected.bits_per_dim and TOKEN not in card.content
