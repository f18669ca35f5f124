"""benchmarks/quality_per_minute.py's recipes are flags train.py accepts, and each candidate of the recipe re-tune
changes the default in the choice its name says and in nothing else; the benchmarks that run on a device run on
CUDA where there is one unless ``--device`` says otherwise."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import torch

from hf_ddpm.pipelines.auto import default_device
from hf_ddpm.training_args import parse_arguments

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
#: The benchmarks that take ``--device``: those that run a saved model in-process, and throughput.py.
DEVICE_BENCHMARKS = [
    "autoguidance",
    "decoder_term",
    "ode_vs_bound",
    "paired_nll",
    "posthoc_ema",
    "quality_vs_diffusers",
    "sampling_speed",
    "steps_vs_quality",
    "throughput",
]


@pytest.fixture
def recipes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import quality_per_minute

    return quality_per_minute


def parsed(flags: list[str]) -> dict:
    """Every field train.py resolves from ``flags`` on a CPU (one output folder for all, so that it does not
    differ)."""
    values = {}
    for arguments in parse_arguments(["--recipe", "cpu", *flags, "--output_dir", "out"]):
        values.update(vars(arguments))
    return values


def test_every_recipe_and_candidate_parses(recipes):
    for name, flags in {**recipes.RECIPES, **recipes.CANDIDATES}.items():
        assert parsed(flags)["output_dir"] == "out", name


@pytest.mark.parametrize(
    "name, changed",
    [
        ("v_prediction", {"prediction_type": "v_prediction"}),
        ("lr_2e-3", {"learning_rate": 2e-3}),
        ("lr_6e-4", {"learning_rate": 6e-4}),
        ("batch_64", {"train_batch_size": 64, "learning_rate": 1.4e-3}),
        ("batch_16", {"train_batch_size": 16, "learning_rate": 7e-4}),
        ("widths_48_96_96", {"block_out_channels": [48, 96, 96]}),
        ("widths_24_48_48", {"block_out_channels": [24, 48, 48]}),
        ("widths_32_64_64", {"block_out_channels": [32, 64, 64]}),
        ("decoder_min_std_improved_diffusion", {"decoder_min_std": 0.0046679220372336785}),
        ("no_autoguidance", {"guidance_scale": 1.0}),
        ("widths_16_32_32", {}),  # the cpu recipe's own since 2026-12-07, kept for the commands run before
    ],
)
def test_a_candidate_changes_the_default_in_its_named_choice_only(recipes, name, changed):
    default, candidate = parsed(recipes.RECIPES["default"]), parsed(recipes.CANDIDATES[name])
    assert {key: value for key, value in candidate.items() if default[key] != value} == changed


@pytest.mark.parametrize("available, device", [(True, "cuda"), (False, "cpu")])
def test_default_device_is_cuda_where_torch_sees_one(monkeypatch, available, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert default_device() == device


class ParserBuilt(Exception):
    """Raised in place of parsing the command line, carrying the parser that was to parse it."""


@pytest.mark.parametrize("available", [True, False])
@pytest.mark.parametrize("name", DEVICE_BENCHMARKS)
def test_a_benchmark_device_flag_defaults_to_cuda_where_available(monkeypatch, name, available):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    def built(parser, *args, **kwargs):
        raise ParserBuilt(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", built)
    with pytest.raises(ParserBuilt) as caught:
        importlib.import_module(name).main()
    parser = caught.value.args[0]
    assert parser.get_default("device") == default_device() == ("cuda" if available else "cpu")
