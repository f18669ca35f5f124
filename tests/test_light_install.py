"""The light install (issue #12, point 4): with only ``install_requires``, hf_ddpm imports, builds, samples, saves,
loads and computes the ELBO; the training module says in one line which extra to install.

A fresh Python process is given a blocker that makes the training, demo and benchmark packages unimportable (as if
not installed: ``sys.modules[name] = None``, which ``importlib.util.find_spec`` also reports as absent, plus a
``sys.meta_path`` finder refusing their submodules), then runs the library's user-facing calls."""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: Packages of the extras (train, bench, demo) and of the tests; pyyaml is not here: huggingface-hub requires it.
EXTRAS_ONLY = (
    "accelerate",
    "datasets",
    "transformers",
    "tensorboard",
    "trackio",
    "wandb",
    "gradio",
    "gradio_client",
    "matplotlib",
    "scipy",
)

SCRIPT = """
import importlib.abc
import sys

BLOCKED = set({blocked!r})
for name in BLOCKED:
    sys.modules[name] = None


class RefuseExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, RefuseExtras())

import tempfile

import torch

import hf_ddpm
import hf_ddpm.cli
from hf_ddpm import BoundOptions, DenoisingUNet, HFDDPMPipeline, HFDDPMScheduler, evaluate_bound

torch.manual_seed(0)
unet = DenoisingUNet(sample_size=8, block_out_channels=(8, 16), attention_resolutions=())
pipe = HFDDPMPipeline(unet=unet, scheduler=HFDDPMScheduler(num_train_timesteps=10, variance_type="learned_range"))
pipe.set_progress_bar_config(disable=True)
images = pipe(batch_size=2, num_inference_steps=3, output_type="pt").images
assert images.shape == (2, 1, 8, 8), images.shape
pixels = torch.randint(0, 256, (3, 1, 8, 8)).double() / 127.5 - 1
elbo = pipe.elbo(pixels, generator=torch.Generator().manual_seed(0))
assert torch.isfinite(elbo.per_image).all()
bound = evaluate_bound(pipe, pixels, BoundOptions(timesteps_per_image=2), generator=torch.Generator().manual_seed(0))
assert bound.num_images == 3 and bound.bits_per_dim > 0
with tempfile.TemporaryDirectory() as folder:
    pipe.save_pretrained(folder)
    loaded = HFDDPMPipeline.from_pretrained(folder)
    assert type(loaded.scheduler).__name__ == "HFDDPMScheduler"
leaked = sorted(name for name in BLOCKED if sys.modules.get(name) is not None)
assert not leaked, leaked
try:
    import hf_ddpm.training_args
except ImportError as error:
    print("TRAINING_ARGS:", error)
print("LIGHT_OK")
"""


def test_the_library_loads_samples_and_bounds_without_the_training_extras(tmp_path):
    script = tmp_path / "light.py"
    script.write_text(textwrap.dedent(SCRIPT.format(blocked=EXTRAS_ONLY)))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=None, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "LIGHT_OK"
    message = next(line for line in lines if line.startswith("TRAINING_ARGS:"))
    assert message == (
        "TRAINING_ARGS: hf_ddpm's training needs the train extra (accelerate is not installed): "
        "pip install 'hf_ddpm[train]'"
    )
