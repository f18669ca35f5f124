"""How hf_ddpm names its classes in model_index.json (hf_ddpm.hub.naming): ["hf_ddpm", ClassName] for the
public classes, whatever module defines them, and nothing for any other class."""

from __future__ import annotations

import sys

from diffusers import DDPMScheduler, UNet2DModel

import hf_ddpm
from hf_ddpm.ddpm.chain import DiffusionChain
from hf_ddpm.ddpm.scheduler import HFDDPMScheduler
from hf_ddpm.hub.naming import PACKAGE, library_of, package_namespace


def test_public_classes_are_named_by_the_package():
    assert PACKAGE == "hf_ddpm"
    assert library_of(HFDDPMScheduler) == ("hf_ddpm", "HFDDPMScheduler")
    assert library_of(HFDDPMScheduler(num_train_timesteps=10)) == ("hf_ddpm", "HFDDPMScheduler")
    assert package_namespace(HFDDPMScheduler) is sys.modules["hf_ddpm"] is hf_ddpm
    for name in hf_ddpm.__all__:
        value = getattr(hf_ddpm, name)
        if isinstance(value, type):
            assert library_of(value) == ("hf_ddpm", name), name


def test_other_classes_have_no_hf_ddpm_name():
    from hf_ddpm.evaluation import BatchBound  # an hf_ddpm class that is not public

    assert library_of(DDPMScheduler) is None and library_of(UNet2DModel) is None
    assert package_namespace(DDPMScheduler) is None
    assert library_of(BatchBound) is None
    assert library_of(DiffusionChain) == ("hf_ddpm", "DiffusionChain")  # public: exported from hf_ddpm


def test_a_class_of_the_remote_code_module_is_named_by_that_module():
    remote = type(sys)("diffusers_modules.local.hf_ddpm")

    class Thing:
        pass

    Thing.__module__ = remote.__name__
    remote.Thing = Thing
    sys.modules[remote.__name__] = remote
    try:
        assert package_namespace(Thing) is remote and library_of(Thing) == ("hf_ddpm", "Thing")
        del remote.Thing  # not in the module's namespace: not one of its public classes
        assert library_of(Thing) is None
    finally:
        del sys.modules[remote.__name__]
