"""Sharing hf_ddpm pipelines on the Hugging Face Hub: the model card, and the push of a complete repo.

A pushed repo (or a folder written by :func:`save_pipeline_repo`) holds::

    model_index.json                      the pipeline ("hf_ddpm" components), from save_pretrained
    unet/config.json, unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json, ...
    hf_ddpm.py                            self-contained remote code (hf_ddpm.remote_code), for stock diffusers
    unet/hf_ddpm.py, scheduler/hf_ddpm.py the same file where diffusers looks for the "hf_ddpm" library's code
    README.md                             the model card (render_model_card)
    samples.png                           the sample grid the card shows (optional)
    training_args.json                    the resolved training arguments, secrets removed (optional)

Weights are safetensors only. The Hub token (argument, ``HF_TOKEN`` or the login cache, resolved by
huggingface_hub) is never written: secret-looking keys are dropped from the arguments, and a push that would
upload any file containing the token is refused before anything is sent.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token

from .pipelines.registration import PACKAGE
from .remote_code import REMOTE_CODE_FILENAME, remote_code_files

SAMPLE_GRID_PATH = "samples.png"
TRAINING_ARGS_PATH = "training_args.json"
CARD_PATH = "README.md"
TEMPLATE = "templates/model_card.md"
TASK = "unconditional-image-generation"
#: Card tags of every hf_ddpm repo, and those of each pipeline class.
BASE_TAGS = ["pytorch", "diffusers", TASK, PACKAGE]
PIPELINE_TAGS = {"HFDDPMPipeline": ["ddpm"], "VAEPipeline": ["vae"]}
#: Argument names that hold credentials (matched as whole ``_``-separated words): never written anywhere.
SECRET_KEY = re.compile(r"(?:^|_)(?:token|secret|password|passwd|api_key|credentials?)(?:$|_)", re.IGNORECASE)


@dataclass
class NLLResult:
    """A negative log-likelihood bound on held-out images, in bits/dim.

    Attributes:
        bits_per_dim: the bound (the negative ELBO), averaged over the images.
        dataset_id: Hub id of the evaluation data (the ``model-index`` dataset type), e.g. ``"ylecun/mnist"``.
        dataset_name: its readable name, e.g. ``"MNIST"``.
        split: which images, e.g. ``"test"`` or ``"train[4500:5000]"``.
        num_images: how many images were evaluated.
        standard_error: standard error of ``bits_per_dim`` when it is an estimate; None when computed exactly.
        estimator: how it was computed, in words (shown in the card).
        terms: the bound's parts in bits/dim (they add up to ``bits_per_dim``), e.g. ``{"prior": ...,
            "denoising": ..., "reconstruction": ...}`` for a diffusion model.
    """

    bits_per_dim: float
    dataset_id: str
    dataset_name: str
    split: str
    num_images: int
    standard_error: float | None = None
    estimator: str = "exact: every term of the bound computed"
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingReport:
    """Everything a model card says about a pipeline and the run that trained it. Only ``repo_id`` is required;
    :meth:`for_pipeline` fills the description from the pipeline.

    Attributes:
        repo_id: ``"org/name"``; the usage snippets load it.
        pipeline_class: the hf_ddpm pipeline class the snippet imports.
        description: what the model is (Markdown).
        components: component name -> one-line description (class, parameter count).
        license: an SPDX-style license id the Hub knows.
        datasets: Hub ids of the training data (card metadata).
        train_data: the training data in words (shown in the card).
        training_args: the resolved training arguments (secret-looking keys are never shown).
        nll: the held-out likelihood bound, or None when not evaluated.
        steps: optimizer steps. images_seen: training images processed (steps x global batch).
        wall_time_seconds: training time. hardware: what it ran on, e.g. ``"2 CPU cores, 1 process"``.
        sample_grid: path of the sample grid image relative to the card (None: no image).
        sampling_kwargs: extra arguments of the snippet's pipeline call, e.g. ``{"num_inference_steps": 100}``.
        limitations: limitations beyond the generic ones the card always lists.
    """

    repo_id: str
    pipeline_class: str = "HFDDPMPipeline"
    description: str = ""
    components: dict[str, str] = field(default_factory=dict)
    license: str = "apache-2.0"
    datasets: list[str] = field(default_factory=list)
    train_data: str = ""
    training_args: dict[str, Any] = field(default_factory=dict)
    nll: NLLResult | None = None
    steps: int | None = None
    images_seen: int | None = None
    wall_time_seconds: float | None = None
    hardware: str | None = None
    sample_grid: str | None = SAMPLE_GRID_PATH
    sampling_kwargs: dict[str, Any] = field(default_factory=dict)
    limitations: list[str] = field(default_factory=list)

    @classmethod
    def for_pipeline(cls, pipeline: Any, repo_id: str, **fields: Any) -> TrainingReport:
        """A report with the pipeline's class, description (its docstring's summary) and components filled in;
        ``fields`` set the rest."""
        described = {
            "pipeline_class": type(pipeline).__name__,
            "description": _summary(type(pipeline)),
            "components": _components(pipeline),
        }
        return cls(repo_id=repo_id, **{**described, **fields})


def _summary(cls: type) -> str:
    """The first paragraph of a class docstring, with Sphinx roles turned into Markdown code."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", " ".join(paragraph.split()))


def _components(pipeline: Any) -> dict[str, str]:
    described = {}
    for name, module in pipeline.components.items():
        if module is None:
            continue
        if isinstance(module, torch.nn.Module):
            described[name] = f"`{type(module).__name__}`, {sum(p.numel() for p in module.parameters()):,} parameters"
        else:
            described[name] = f"`{type(module).__name__}`"
    return described


def redact_secrets(arguments: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    """``arguments`` without credential keys (``hub_token``, ``api_key``, ...) and without any value that contains
    ``secret``; nested dicts are cleaned the same way."""
    cleaned = {}
    for key, value in arguments.items():
        if SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, dict):
            cleaned[key] = redact_secrets(value, secret)
        elif not (secret and secret in json.dumps(value, default=str)):
            cleaned[key] = value
    return cleaned


def _number(value: float) -> str:
    """4 decimals, or 3 significant digits in scientific notation for values too small to show that way."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{hours} h {minutes} min" if hours else f"{minutes} min {rest} s" if minutes else f"{rest} s"
    return f"{text} ({seconds:.0f} s)"


def _table_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _card_data(report: TrainingReport) -> ModelCardData:
    """The card's metadata; with a result, a ``model-index`` entry with the NLL in bits/dim on the named set."""
    eval_results = None
    if report.nll is not None:
        nll = report.nll
        eval_results = [
            EvalResult(
                task_type=TASK, dataset_type=nll.dataset_id, dataset_name=nll.dataset_name, dataset_split=nll.split,
                metric_type="nll", metric_name="NLL (bits/dim)", metric_value=nll.bits_per_dim,
            )
        ]
    return ModelCardData(
        license=report.license,
        library_name=PACKAGE,
        pipeline_tag=TASK,
        tags=BASE_TAGS + PIPELINE_TAGS.get(report.pipeline_class, []),
        datasets=report.datasets or None,
        model_name=report.repo_id.split("/")[-1],
        eval_results=eval_results,
    )


def render_model_card(report: TrainingReport) -> ModelCard:
    """The model card of ``report``, rendered from the package's Jinja template (``model_cards/`` in the source
    tree) with huggingface_hub's ``ModelCard.from_template``, which parses the rendered metadata back (the
    ``model-index`` into eval results), so metadata that does not validate raises here rather than on the Hub."""
    template = resources.files(PACKAGE).joinpath(TEMPLATE).read_text(encoding="utf-8")
    call_arguments = "".join(f", {key}={value!r}" for key, value in report.sampling_kwargs.items())
    arguments = redact_secrets(report.training_args, get_token())
    return ModelCard.from_template(
        _card_data(report),
        template_str=template,
        report=report,
        package=PACKAGE,
        remote_code=REMOTE_CODE_FILENAME,
        custom_pipeline=REMOTE_CODE_FILENAME.removesuffix(".py"),
        call_arguments=call_arguments,
        training_rows=[(key, _table_value(value)) for key, value in arguments.items()],
        number=_number,
        duration=_duration,
    )


def _write_sample_grid(sample_grid: PIL.Image.Image | str | Path, path: Path) -> None:
    image = sample_grid if isinstance(sample_grid, PIL.Image.Image) else PIL.Image.open(sample_grid)
    image.save(path, format="PNG")


def save_pipeline_repo(
    pipeline: Any,
    folder: str | Path,
    *,
    card: ModelCard | None = None,
    sample_grid: PIL.Image.Image | str | Path | None = None,
    training_args: dict[str, Any] | None = None,
) -> list[str]:
    """Write the repo layout of ``pipeline`` (see the module docstring) into ``folder``: safetensors weights,
    the remote code, and the card, sample grid (as ``samples.png``) and training arguments (without secrets)
    when given. Returns the files then in ``folder`` (relative paths): for a new folder, exactly the repo's."""
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True)
    for relative, source in remote_code_files(pipeline).items():
        (folder / relative).write_text(source, encoding="utf-8")
    if card is not None:
        card.save(folder / CARD_PATH)
    if sample_grid is not None:
        _write_sample_grid(sample_grid, folder / SAMPLE_GRID_PATH)
    if training_args is not None:
        arguments = json.dumps(redact_secrets(training_args), indent=2, default=str)
        (folder / TRAINING_ARGS_PATH).write_text(arguments, encoding="utf-8")
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _refuse_files_with_secret(folder: Path, files: list[str], secret: str | None) -> None:
    if not secret:
        return
    leaking = [name for name in files if secret.encode() in (folder / name).read_bytes()]
    if leaking:
        raise ValueError(
            f"Refusing to push: {', '.join(leaking)} contain(s) the Hub token. Remove it from what you pass "
            "(card text, training arguments) and push again; nothing was uploaded."
        )


def _commit_message(pipeline: Any, prefix: str) -> str:
    where = f" to {prefix.rstrip('/')}" if prefix else ""
    return f"Upload {type(pipeline).__name__}{where} ({PACKAGE} {importlib.metadata.version(PACKAGE)})"


def push_pipeline_to_hub(
    pipeline: Any,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    sample_grid: PIL.Image.Image | str | Path | None = None,
    training_args: dict[str, Any] | None = None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    path_in_repo: str = "",
    commit_message: str | None = None,
) -> CommitInfo:
    """Push ``pipeline`` to the Hub repo ``repo_id`` (created if missing) in one commit.

    Args:
        pipeline: an hf_ddpm pipeline (``HFDDPMPipeline``, ``VAEPipeline``, ...).
        repo_id: ``"org/name"``.
        card: the model card (:func:`render_model_card`). At the repo root it defaults to a card that describes
            the pipeline alone; in a subfolder there is none unless given.
        sample_grid: a PIL image or an image file, stored as ``samples.png`` (where the card links it).
        training_args: the resolved training arguments, stored as ``training_args.json`` without secrets.
        token: a Hub token; defaults to ``HF_TOKEN`` or the login cache. It is never written to any file.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to (created from the default branch if missing); default: the main branch.
        path_in_repo: a folder of the repo for the whole layout, e.g. ``"checkpoints/step-500"`` for a checkpoint
            (load it with ``from_pretrained(repo_id, subfolder=...)``).
        commit_message: defaults to a message naming the pipeline class and the hf_ddpm version.

    Returns:
        the ``CommitInfo`` of the commit (``.oid`` is the commit sha to pin with ``revision=``).
    """
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo.strip("/") else ""
    secret = token or get_token()
    arguments = redact_secrets(training_args, secret) if training_args is not None else None
    if card is None and not prefix:
        grid = SAMPLE_GRID_PATH if sample_grid is not None else None
        report = TrainingReport.for_pipeline(pipeline, repo_id, sample_grid=grid, training_args=arguments or {})
        card = render_model_card(report)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_ddpm_push_") as staging:
        folder = Path(staging)
        files = save_pipeline_repo(pipeline, folder, card=card, sample_grid=sample_grid, training_args=arguments)
        _refuse_files_with_secret(folder, files, secret)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=prefix + f, path_or_fileobj=str(folder / f)) for f in files],
            commit_message=commit_message or _commit_message(pipeline, prefix),
            revision=revision,
        )
