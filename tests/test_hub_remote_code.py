"""The single-file remote code (hf_ddpm.hub.remote_code) of every public pipeline class: it bundles, it is one
self-contained module, and stock diffusers without hf_ddpm loads a saved repo with it and samples what the
installed pipeline samples."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import check_imports, find_pipeline_class

import hf_ddpm
from helpers import (
    BLOCK_HF_DDPM,
    SAMPLES,
    code_blocks,
    public_pipeline_classes,
    samples,
    snippet_images,
    tiny_pipeline_of,
)
from hf_ddpm import save_pipeline_repo
from hf_ddpm.hub.naming import library_of
from hf_ddpm.hub.remote_code import REMOTE_CODE_FILENAME, RemoteCodeError, bundle_source, remote_code_files
from olah_server import run_python

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = public_pipeline_classes()


def test_every_public_pipeline_is_covered():
    assert {"HFDDPMPipeline", "VAEPipeline"} <= set(PIPELINES)
    for name in PIPELINES:
        pipeline, _ = tiny_pipeline_of(name)
        assert isinstance(pipeline, DiffusionPipeline) and library_of(pipeline) == ("hf_ddpm", name)


@pytest.mark.parametrize("name", PIPELINES)
def test_bundle_source_succeeds_for_every_public_pipeline_class(name):
    """The import rules (module-level, by name, no clashes, one pipeline) hold for every pipeline's modules, on
    every run and not only when a trained pipeline is saved."""
    cls = getattr(hf_ddpm, name)
    source = bundle_source([cls.__module__])
    assert re.search(rf"^class {name}\(", source, flags=re.M)
    assert not re.search(r"^\s*(from|import)\s+hf_ddpm\b", source, flags=re.M)
    assert source.count("from __future__ import annotations") == 1


@pytest.mark.parametrize("name", PIPELINES)
def test_remote_code_is_one_self_contained_module_that_survives_reexecution(name, tmp_path, monkeypatch):
    pipeline, _ = tiny_pipeline_of(name)
    files = remote_code_files(pipeline)
    components = [c for c, module in pipeline.components.items() if module is not None and library_of(module)]
    assert set(files) == {REMOTE_CODE_FILENAME, *(f"{c}/{REMOTE_CODE_FILENAME}" for c in components)}
    if name == "HFDDPMPipeline":
        assert set(files) == {"hf_ddpm.py", "unet/hf_ddpm.py", "scheduler/hf_ddpm.py"}
    assert len(set(files.values())) == 1
    path = tmp_path / "hf_ddpm.py"
    path.write_text(files["hf_ddpm.py"])
    assert check_imports(str(path)) == []  # diffusers' own check: no relative imports to fetch
    assert not re.search(r"^\s*(from|import)\s+hf_ddpm\b", files["hf_ddpm.py"], flags=re.M)

    spec = importlib.util.spec_from_file_location("remote_test_modules.hf_ddpm", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as importlib (and so diffusers) registers it
    spec.loader.exec_module(module)
    classes = [name, *(type(pipeline.components[c]).__name__ for c in components)]
    first = [getattr(module, c) for c in classes]
    spec.loader.exec_module(module)  # as diffusers does for the next component
    assert [getattr(module, c) for c in classes] == first
    assert find_pipeline_class(module) is getattr(module, name)


def _fake_package(root: Path, name: str, modules: dict[str, str]) -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for module, source in modules.items():
        (root / name / f"{module}.py").write_text(source)


@pytest.mark.parametrize(
    ("b_source", "message"),
    [
        ("from .a import helper\n\ndef helper():\n    return 2\n", "bound differently in"),
        ("from .a import helper as renamed\n", "with \\* or a new name"),
        ("from . import a\n", "imports from the package"),
        ("def f():\n    from .a import helper\n", "inside a block"),
        ("import bundlepkg_x.a\n", "with 'import'"),
        (
            "from .a import helper\nfrom diffusers import DiffusionPipeline\n\n"
            "class Q(DiffusionPipeline):\n    pass\n",
            "define the pipelines",
        ),
    ],
)
def test_modules_that_cannot_share_one_file_are_rejected(tmp_path, monkeypatch, b_source, message):
    name = f"bundlepkg_{abs(hash(b_source))}"
    a_source = "from diffusers import DiffusionPipeline\n\ndef helper():\n    return 1\n\n"
    a_source += "class P(DiffusionPipeline):\n    pass\n"
    _fake_package(tmp_path, name, {"a": a_source, "b": b_source.replace("bundlepkg_x", name)})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RemoteCodeError, match=message):
        bundle_source([f"{name}.b"], package=name)


def test_private_helpers_of_one_name_in_two_modules_each_keep_their_own(tmp_path, monkeypatch):
    """Two modules' ``_scale`` (bound differently) are renamed apart in the bundle, uses and all, while an attribute
    ````box._scale``, a string and a comment of that name are left alone; a private name another module imports keeps
    its name."""
    name = "bundlepkg_private"
    a_source = "_scale = 2\n_shared = 10\n\ndef double(x):\n    # _scale here is a comment\n    return x * _scale\n"
    b_source = (
        "from .a import _shared, double\n\n\ndef _scale(x):\n    return x + 1\n\n\n"
        "def shifted(x, box):\n    return _scale(double(x)) + _shared, box._scale, '_scale'\n"
    )
    _fake_package(tmp_path, name, {"a": a_source, "b": b_source})
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = bundle_source([f"{name}.b"], package=name)
    namespace: dict = {}
    exec(compile(bundle, "bundle.py", "exec"), namespace)
    assert namespace["double"](3) == 6
    assert namespace["shifted"](3, types.SimpleNamespace(_scale="attribute")) == (17, "attribute", "_scale")
    assert "_shared" in namespace and "_scale" not in namespace  # kept (imported) / renamed apart in both modules


# ============================================================================================ stock diffusers
@pytest.mark.parametrize(
    "name, arguments, guided",
    [(name, "", False) for name in PIPELINES]
    + [("HFDDPMPipeline", 'custom_pipeline="hf_ddpm", ', False), ("HFDDPMPipeline", "", True)],
    ids=[*PIPELINES, "pushed-before-one-call-loading", "autoguided"],
)
def test_stock_diffusers_without_hf_ddpm_samples_every_pipeline_like_the_installed_one(
    name, arguments, guided, tmp_path
):
    """save_pipeline_repo writes a folder; a fresh interpreter in which hf_ddpm cannot be imported loads it with
    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True), no other argument, and samples. A repo pushed
    before model_index.json named the remote-code file (``_class_name`` a plain string) still loads with
    ``custom_pipeline="hf_ddpm"``. An autoguided DDPM brings its guide_unet and samples guided."""
    pipeline, call = tiny_pipeline_of(name)
    if guided:
        guide = tiny_pipeline_of(name, seed=1)[0].unet
        pipeline = type(pipeline)(**{**pipeline.components, "guide_unet": guide}, guidance_scale=2.0)
        pipeline.set_progress_bar_config(disable=True)
    folder = tmp_path / "repo"
    save_pipeline_repo(pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["hf_ddpm", name]
    if arguments:
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
    code = (
        BLOCK_HF_DDPM
        + f"""
import json, numpy as np, torch
try:
    import hf_ddpm
    importable = True
except ModuleNotFoundError:
    importable = False
from diffusers import DiffusionPipeline
pipeline = DiffusionPipeline.from_pretrained({str(folder)!r}, {arguments}trust_remote_code=True)
pipeline.set_progress_bar_config(disable=True)
images = pipeline(batch_size=3, generator=torch.Generator().manual_seed(1), output_type="np", **{call!r}).images
np.save("images.npy", images)
try:
    pipeline.push_to_hub("org/never")
    push = "pushed"
except ModuleNotFoundError as error:
    push = str(error)
json.dump({{"importable": importable, "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "hf_ddpm"),
           "class": type(pipeline).__module__ + "." + type(pipeline).__name__,
           "components": {{k: type(v).__module__ for k, v in pipeline.components.items()}}, "push": push}},
          open("facts.json", "w"))
"""
    )
    run_python(code, {"HF_HOME": str(tmp_path / "hf_home")}, cwd=tmp_path)
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["importable"] is False and facts["loaded"] == []
    assert facts["class"].startswith("diffusers_modules.") and facts["class"].endswith(f".{name}")
    components = [c for c, module in pipeline.components.items() if module is not None and library_of(module)]
    assert all(facts["components"][c].startswith("diffusers_modules.") for c in components), facts["components"]
    assert "push_to_hub needs the hf_ddpm package" in facts["push"]
    expected = samples(pipeline, batch_size=3, **call)
    assert expected.std() > 1e-3  # images that differ, so that equal images mean the same computation
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected, rtol=0, atol=1e-5)


def test_stock_diffusers_without_hf_ddpm_loads_the_repo_with_trust_remote_code(hub, pushed, tmp_path):
    """The card's remote-code snippet, by repo id through the Hub (tests/olah_server.py), gives the same images."""
    _, remote_snippet = code_blocks(pushed.card.text)
    code = (
        BLOCK_HF_DDPM
        + SAMPLES
        + remote_snippet
        + """
import json, importlib.util
np.save("snippet.npy", np.stack([np.asarray(image) for image in images]))
np.save("main.npy", samples(pipeline))
try:
    importlib.util.find_spec("hf_ddpm")
    importable = True
except ModuleNotFoundError:
    importable = False
json.dump({"importable": importable, "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "hf_ddpm"),
           "class": type(pipeline).__module__, "unet": list(pipeline.config["unet"])}, open("facts.json", "w"))
"""
    )
    run_python(code, {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf_home")}, cwd=tmp_path)
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["importable"] is False and facts["loaded"] == []
    assert facts["class"].startswith("diffusers_modules.") and facts["unet"] == ["hf_ddpm", "DenoisingUNet"]
    np.testing.assert_array_equal(np.load(tmp_path / "snippet.npy"), snippet_images(pushed.second))
    np.testing.assert_array_equal(np.load(tmp_path / "main.npy"), samples(pushed.second))
