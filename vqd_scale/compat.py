"""Make `import open_clip` (and diffusers) work where torchvision's C ops cannot load (CPU torch + CUDA torchvision).

The only torchvision wheel that accepts torch 2.13.0 is a CUDA build; its `_C` extension fails on
CPU torch and the import dies with "operator torchvision::nms does not exist" while registering
fake kernels. Defining the missing op schemas first lets the Python parts (transforms) import.
We never call a torchvision C op. Where torchvision imports normally this is a no-op. diffusers' model
classes import transformers, which imports torchvision: `import_diffusers()` applies the same patch first.
"""
from __future__ import annotations

import importlib
import sys

_done = False


def import_open_clip():
    """Import and return open_clip, patching torchvision's op schemas only if needed."""
    global _done
    if not _done:
        try:
            import torchvision  # noqa: F401
        except (RuntimeError, ImportError):
            import torch
            for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[mod]
            lib = torch.library.Library("torchvision", "DEF")  # kept alive on the module below
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            globals()["_tv_lib"] = lib
            importlib.import_module("torchvision")
        _done = True
    return importlib.import_module("open_clip")


def import_diffusers():
    """Import and return diffusers after the torchvision patch (its model classes import torchvision)."""
    import_open_clip()
    return importlib.import_module("diffusers")
