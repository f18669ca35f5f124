"""How hf_ddpm names its classes in ``model_index.json``: ``["hf_ddpm", ClassName]``, whatever module defines them.

diffusers records a component from outside its own libraries under its full module path
(``["hf_ddpm.models.unet", "DenoisingUNet"]``), which breaks every saved model when a module moves. hf_ddpm
records its public classes under the package name instead. The same rule holds in the self-contained remote code
(``hf_ddpm.py``) that a Hub repo ships: there "the hf_ddpm namespace" of a class is that single module.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

PACKAGE = "hf_ddpm"


def package_namespace(cls: type) -> ModuleType | None:
    """The module that holds hf_ddpm's public classes for ``cls``: the installed ``hf_ddpm`` package for its own
    classes, the module itself for a class from the remote-code copy ``hf_ddpm.py`` that stock diffusers imports
    from a Hub repo, None for any other class."""
    parts = cls.__module__.split(".")
    if parts[0] == PACKAGE:
        return sys.modules[PACKAGE]
    if parts[-1] == PACKAGE:
        return sys.modules.get(cls.__module__)
    return None


def library_of(module: Any) -> tuple[str, str] | None:
    """``("hf_ddpm", ClassName)`` for an instance (or class) of a public hf_ddpm class, None for anything else."""
    cls = module if isinstance(module, type) else type(module)
    namespace = package_namespace(cls)
    if namespace is not None and getattr(namespace, cls.__name__, None) is cls:
        return PACKAGE, cls.__name__
    return None
