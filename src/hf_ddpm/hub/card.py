"""The model card of an hf_ddpm pipeline: what the Hub shows, rendered from the package's template.

:func:`render_model_card` renders a :class:`TrainingReport` (the pipeline, the run that trained it, its measured
likelihood bound) with huggingface_hub's ``ModelCard``, whose metadata parser validates the ``model-index``.
Credentials never reach a card: :func:`redact_secrets` removes them from the training arguments it shows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, get_token

from ..evaluation import BoundResult
from .naming import PACKAGE
from .remote_code import REMOTE_CODE_FILENAME

SAMPLE_GRID_PATH = "samples.png"
TEMPLATE = "templates/model_card.md"
TASK = "unconditional-image-generation"
#: Card tags of every hf_ddpm repo, and those of each pipeline class.
BASE_TAGS = ["diffusers", "pytorch", TASK, PACKAGE, "custom-pipeline", "likelihood"]
PIPELINE_TAGS = {
    "HFDDPMPipeline": ["ddpm", "diffusion"],
    "VAEPipeline": ["vae"],
    "VDMPipeline": ["vdm", "variational-diffusion-model", "diffusion"],
}
#: The papers behind each pipeline class (arXiv id, what it is), linked from the card; the Hub lists them.
PAPERS = {
    "2208.11970": "Luo 2022, Understanding Diffusion Models: A Unified Perspective (the derivation followed here)",
    "1312.6114": "Kingma & Welling 2013, Auto-Encoding Variational Bayes",
    "2006.11239": "Ho et al. 2020, Denoising Diffusion Probabilistic Models",
    "2102.09672": "Nichol & Dhariwal 2021, Improved Denoising Diffusion Probabilistic Models",
    "2107.00630": "Kingma et al. 2021, Variational Diffusion Models",
    "1509.00519": "Burda et al. 2015, Importance Weighted Autoencoders",
}
PIPELINE_PAPERS = {
    "HFDDPMPipeline": ["2208.11970", "2006.11239", "2102.09672", "2107.00630"],
    "VAEPipeline": ["2208.11970", "1312.6114", "1509.00519"],
    "VDMPipeline": ["2208.11970", "2107.00630", "2006.11239"],
}
#: Argument names that hold credentials (matched as whole ``_``-separated words): never written anywhere.
SECRET_KEY = re.compile(r"(?:^|_)(?:token|secret|password|passwd|api_key|credentials?)(?:$|_)", re.IGNORECASE)


@dataclass
class NLLResult:
    """A model's likelihood bound on a named evaluation set: what the card's text and ``model-index`` report.

    Attributes:
        bound: the bound, per image and summarised (:func:`hf_ddpm.evaluation.evaluate_bound`).
        dataset_id: Hub id of the evaluation data (the ``model-index`` dataset type), e.g. ``"ylecun/mnist"``.
        dataset_name: its readable name, e.g. ``"MNIST"``.
        split: which images, e.g. ``"test"``.
    """

    bound: BoundResult
    dataset_id: str
    dataset_name: str
    split: str


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
        plots: further images the results show after the sample grid, path relative to the card -> caption
            (e.g. ``{"loss_curve.png": "The training loss"}``, as train.py writes them).
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
    plots: dict[str, str] = field(default_factory=dict)
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


#: An absolute POSIX path (or one from ``~``), not part of a URL, a fraction or a word such as bits/dim.
LOCAL_PATH = re.compile(r"(?<![\w:/.~-])(?:~/|/)(?:[\w.@+-]+/)*[\w.@+-]+")


def hide_local_paths(text: str) -> str:
    """``text`` with every absolute (or ``~``) path replaced by its last component, so that what a repo shares names
    the data's folder (``mnist``) but never where it lay on the training machine (``/home/me/data/mnist``)."""
    return LOCAL_PATH.sub(lambda match: match.group(0).rstrip("/").rsplit("/", 1)[-1] or match.group(0), text)


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
        estimator = ", probability-flow ODE" if nll.bound.per_image_nfe is not None else ""
        eval_results = [
            EvalResult(
                task_type=TASK,
                dataset_type=nll.dataset_id,
                dataset_name=nll.dataset_name,
                dataset_split=nll.split,
                metric_type="nll",
                metric_name=f"NLL (bits/dim{estimator})",
                metric_value=nll.bound.bits_per_dim,
            ),
            EvalResult(
                task_type=TASK,
                dataset_type=nll.dataset_id,
                dataset_name=nll.dataset_name,
                dataset_split=nll.split,
                metric_type="nll_standard_error",
                metric_name=f"NLL standard error (bits/dim{estimator})",
                metric_value=nll.bound.standard_error,
            ),
        ]
    return ModelCardData(
        license=report.license,
        library_name="diffusers",
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
    card = ModelCard.from_template(
        _card_data(report),
        template_str=template,
        report=report,
        package=PACKAGE,
        remote_code=REMOTE_CODE_FILENAME,
        call_arguments=call_arguments,
        training_rows=[(key, _table_value(value)) for key, value in arguments.items()],
        papers=[(arxiv, PAPERS[arxiv]) for arxiv in PIPELINE_PAPERS.get(report.pipeline_class, [])],
        number=_number,
        duration=_duration,
    )
    return ModelCard(hide_local_paths(str(card)))
