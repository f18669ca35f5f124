"""hf_ddpm.dataclass_flags: the flags of train.py's dataclasses, read as transformers' HfArgumentParser read them
(which train.py used before), and its one-line errors; parse_arguments' recipe and run length from any spelling."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hf_ddpm.dataclass_flags import DataclassArgumentParser, flag_type, string_to_bool
from hf_ddpm.training_args import parse_arguments


@dataclass
class Model:
    width: int = 32
    rate: float | None = None
    name: str = field(default="ddpm", metadata={"help": "what", "aliases": ["--model_name"]})
    widths: list[int] | None = None


@dataclass
class Run:
    use_ema: bool = True
    center_crop: bool = False
    compile: bool | None = None
    candidates: list[float] = field(default_factory=lambda: [0.05, 0.1])


def parse(*args: str) -> tuple[Model, Run]:
    return DataclassArgumentParser([Model, Run], prog="train.py").parse_into_dataclasses(args)


def test_defaults_and_every_type_of_field():
    model, run = parse()
    assert (model, run) == (Model(), Run())
    model, run = parse("--width", "8", "--rate", "3e-4", "--name", "vdm", "--widths", "8", "16", "--candidates", "1")
    assert model == Model(width=8, rate=3e-4, name="vdm", widths=[8, 16])
    assert run.candidates == [1.0] and isinstance(run.candidates[0], float)


def test_a_default_factory_gives_each_parse_its_own_list():
    first, second = parse()[1], parse()[1]
    first.candidates.append(9.0)
    assert second.candidates == [0.05, 0.1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--center_crop"], True),
        (["--center_crop", "true"], True),
        (["--center_crop", "YES"], True),
        (["--center_crop", "1"], True),
        (["--center_crop", "false"], False),
        (["--center_crop", "n"], False),
        (["--center_crop", "0"], False),
    ],
)
def test_a_bare_boolean_flag_is_true_and_takes_true_or_false(args, expected):
    assert parse(*args)[1].center_crop is expected


def test_a_boolean_that_defaults_to_true_also_has_a_no_flag_in_both_spellings():
    assert parse("--no_use_ema")[1].use_ema is False
    assert parse("--no-use-ema")[1].use_ema is False
    assert parse("--use_ema", "false", "--use_ema")[1].use_ema is True  # the last one given
    with pytest.raises(SystemExit, match="unknown flag --no_center_crop"):
        parse("--no_center_crop")  # defaults to false: no negative flag


def test_an_optional_boolean_is_unset_true_or_false():
    assert parse()[1].compile is None
    assert parse("--compile")[1].compile is True
    assert parse("--compile", "false")[1].compile is False


def test_dashed_spellings_and_aliases_set_the_same_field():
    assert parse("--center-crop")[1].center_crop is True
    assert parse("--model_name", "vae")[0].name == "vae"
    assert parse("--width=4")[0].width == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--widht", "3"], r"^unknown flag --widht \(did you mean --width\?\); train.py --help lists the flags.$"),
        (["--wid", "3"], r"^unknown flag --wid "),  # a prefix is not an abbreviation of --width
        (["--zzz"], r"^unknown flag --zzz; train.py --help"),
        (["stray"], r"^unexpected value stray \(every value follows its flag\)"),
        (["--width", "2.5"], r"^argument --width: invalid int value: '2.5'; train.py --help"),
        (["--center_crop", "maybe"], r"^argument --center_crop/--center-crop: expected true or false, got 'maybe'"),
        (["--widths"], r"^argument --widths: expected at least one argument"),
    ],
)
def test_an_error_is_one_line_that_names_the_flag(args, message):
    with pytest.raises(SystemExit, match=message) as raised:
        parse(*args)
    assert "\n" not in str(raised.value.code)


def test_given_flags_holds_only_what_the_flags_set_in_any_spelling():
    parser = DataclassArgumentParser([Model, Run])
    assert parser.given_flags([]) == {}
    assert parser.given_flags(["--rate=0.5", "--no-use-ema", "--widths", "1", "2"]) == {
        "rate": 0.5,
        "use_ema": False,
        "widths": [1, 2],
    }


def test_flag_types_and_booleans_words():
    assert flag_type(int | None) == (int, False)
    assert flag_type(list[float]) == (float, True)
    assert flag_type(list[int] | None) == (int, True)
    with pytest.raises(TypeError, match="one type"):
        flag_type(int | str)
    assert [string_to_bool(w) for w in ("True", "y", "T", "No", "F")] == [True, True, True, False, False]


@pytest.mark.parametrize(
    ("argv", "max_train_steps", "train_minutes", "num_epochs"),
    [
        (["--recipe", "cpu"], None, 15.0, None),
        (["--recipe", "cpu", "--max-train-steps", "5"], 5, None, None),  # the dashed spelling replaces the budget
        (["--recipe=cpu", "--max_train_steps=5"], 5, None, None),
        (["--recipe=gpu"], 2000, None, None),
        (["--recipe", "gpu", "--num-epochs", "1"], None, None, 1),  # not overridden by the recipe's 2,000 steps
        (["--recipe", "gpu", "--train-minutes", "2"], None, 2.0, None),
        (["--recipe", "gpu", "--recipe", "cpu"], None, 15.0, None),  # the last one given
    ],
)
def test_the_recipe_and_the_users_run_length_are_read_in_any_spelling(
    argv, max_train_steps, train_minutes, num_epochs
):
    train_args = parse_arguments(argv)[2]
    assert (train_args.max_train_steps, train_args.train_minutes, train_args.num_epochs) == (
        max_train_steps,
        train_minutes,
        num_epochs,
    )


def test_a_config_file_is_read_with_the_equals_spelling(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 2e-4\nmax_train_steps: 7\n")
    train_args = parse_arguments([f"--config={config}", "--recipe", "cpu"])[2]
    assert (train_args.learning_rate, train_args.max_train_steps, train_args.train_minutes) == (2e-4, 7, None)
