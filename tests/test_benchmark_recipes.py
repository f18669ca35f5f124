"""benchmarks/quality_per_minute.py's recipes are flags train.py accepts, and each candidate of the recipe re-tune
changes the default in the choice its name says and in nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_ddpm.training_args import parse_arguments


@pytest.fixture
def recipes(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
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
