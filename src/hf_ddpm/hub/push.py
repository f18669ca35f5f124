"""Sharing hf_ddpm pipelines on the Hugging Face Hub: writing a complete repo, and pushing it.

A pushed repo (or a folder written by :func:`save_pipeline_repo`) holds::

    model_index.json                      the pipeline ("hf_ddpm" components), from save_pretrained
    unet/config.json, unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json, ...
    hf_ddpm.py                            self-contained remote code (hf_ddpm.hub.remote_code), for stock diffusers
    unet/hf_ddpm.py, scheduler/hf_ddpm.py the same file where diffusers looks for the "hf_ddpm" library's code
    README.md                             the model card (hf_ddpm.hub.card.render_model_card)
    samples.png                           the sample grid the card shows (optional)
    loss_curve.png, bound_by_time.png     further images the card shows (optional; any ``images`` given)
    training_args.json                    the resolved training arguments, secrets removed (optional)

No absolute path of the machine that pushes appears in the card or the pushed arguments
(:func:`hf_ddpm.hub.card.hide_local_paths`); a local folder keeps them, so ``--config training_args.json`` repeats
the run there.

Weights are safetensors only. The Hub token (argument, ``HF_TOKEN`` or the login cache, resolved by
huggingface_hub) is never written: secret-looking keys are dropped from the arguments, and a push that would
upload any file containing the token is refused before anything is sent.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

import PIL.Image
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token

from .card import SAMPLE_GRID_PATH, TrainingReport, hide_local_paths, redact_secrets, render_model_card
from .loading import MODEL_INDEX
from .naming import PACKAGE
from .registration import make_readable
from .remote_code import REMOTE_CODE_FILENAME, remote_code_files

TRAINING_ARGS_PATH = "training_args.json"
CARD_PATH = "README.md"


def _write_sample_grid(sample_grid: PIL.Image.Image | str | Path, path: Path) -> None:
    image = sample_grid if isinstance(sample_grid, PIL.Image.Image) else PIL.Image.open(sample_grid)
    image.save(path, format="PNG")


def _check_image_names(images: dict[str, Any]) -> None:
    """Extra images go to the repo root as PNG files: plain ``name.png`` names, none of the repo's own files."""
    reserved = {SAMPLE_GRID_PATH, CARD_PATH, TRAINING_ARGS_PATH}
    for name in images:
        if "/" in name or "\\" in name or not name.endswith(".png") or name.startswith(".") or name in reserved:
            raise ValueError(
                f"Image name {name!r}: give a plain file name ending in .png, other than "
                f"{', '.join(sorted(reserved))}."
            )


def save_pipeline_repo(
    pipeline: Any,
    folder: str | Path,
    *,
    card: ModelCard | None = None,
    sample_grid: PIL.Image.Image | str | Path | None = None,
    training_args: dict[str, Any] | None = None,
    images: dict[str, PIL.Image.Image | str | Path] | None = None,
) -> list[str]:
    """Write the repo layout of ``pipeline`` (see the module docstring) into ``folder``: safetensors weights,
    the remote code, and the card, sample grid (as ``samples.png``), training arguments (without secrets) and
    further ``images`` (file name in the repo root, e.g. ``"loss_curve.png"`` -> a PIL image or an image file,
    written as PNG) when given. Returns the files then in ``folder`` (relative paths): for a new folder, exactly
    the repo's."""
    folder = Path(folder)
    _check_image_names(images or {})
    pipeline.save_pretrained(folder, safe_serialization=True)
    for relative, source in remote_code_files(pipeline).items():
        (folder / relative).write_text(source, encoding="utf-8")
    record_remote_pipeline_class(folder, type(pipeline).__name__)
    if card is not None:
        card.save(folder / CARD_PATH)
    if sample_grid is not None:
        _write_sample_grid(sample_grid, folder / SAMPLE_GRID_PATH)
    for name, image in (images or {}).items():
        _write_sample_grid(image, folder / name)
    if training_args is not None:
        arguments = json.dumps(redact_secrets(training_args), indent=2, default=str)
        (folder / TRAINING_ARGS_PATH).write_text(arguments, encoding="utf-8")
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    make_readable(folder, files)
    return files


def record_remote_pipeline_class(folder: Path, class_name: str) -> None:
    """Record the pipeline in ``folder/model_index.json`` as ``["hf_ddpm", class_name]``: the remote-code file at the
    repo root and the class in it. Stock diffusers then loads the repo with ``trust_remote_code=True`` and no other
    argument (``pipeline_loading_utils._resolve_custom_pipeline_and_cls``); hf_ddpm's own ``from_pretrained`` reads
    the class name and uses the installed class."""
    index_path = folder / MODEL_INDEX
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["_class_name"] = [REMOTE_CODE_FILENAME.removesuffix(".py"), class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _refuse_files_with_secret(folder: Path, files: list[str], secret: str | None) -> None:
    if not secret:
        return
    leaking = [name for name in files if secret.encode() in (folder / name).read_bytes()]
    if leaking:
        raise ValueError(
            f"Refusing to push: {', '.join(leaking)} contain(s) the Hub token. Remove it from what you pass "
            "(card text, training arguments) and push again; nothing was uploaded."
        )


def check_repo_id(repo_id: str, flag: str) -> None:
    """Raise ``ValueError`` (one line) unless ``repo_id`` is a valid Hub repo id by huggingface_hub's own validator
    (NAME or ORG/NAME of letters, digits, '-', '_' and '.'; such an id cannot break out of the code or text it is
    written into). ``flag`` names where it came from in the message."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{flag} {repo_id!r} is not a Hub repo id ORG/NAME: {error}") from None


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
    images: dict[str, PIL.Image.Image | str | Path] | None = None,
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
        images: further images, file name at the layout's root (``"loss_curve.png"``) -> a PIL image or an image
            file, stored as PNG; the card given should link them (``TrainingReport.plots``). The default card shows
            each, captioned with its name.
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
    arguments = None
    if training_args is not None:  # what others see: no credentials, no paths of this machine
        arguments = json.loads(hide_local_paths(json.dumps(redact_secrets(training_args, secret), default=str)))
    if card is None and not prefix:
        grid = SAMPLE_GRID_PATH if sample_grid is not None else None
        plots = {name: Path(name).stem.replace("_", " ") for name in images or {}}
        report = TrainingReport.for_pipeline(
            pipeline, repo_id, sample_grid=grid, plots=plots, training_args=arguments or {}
        )
        card = render_model_card(report)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_ddpm_push_") as staging:
        folder = Path(staging)
        files = save_pipeline_repo(
            pipeline, folder, card=card, sample_grid=sample_grid, training_args=arguments, images=images
        )
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
