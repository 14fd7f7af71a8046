"""adaptkit: adapt one frozen Vision Transformer to many image tasks with small adapters and a registry.

The public names below are imported on first use (PEP 562), so that ``import adaptkit`` (and the command line,
which imports it) does not pay for torch and timm until a name that needs them is used.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from adaptkit.lazy import lazy_names
from adaptkit.timm_registry import register_with_timm

__version__ = "0.1.0"

_WHERE = {
    "DEFAULT_BACKBONE": "adaptkit.backbone", "Backbone": "adaptkit.backbone", "create_backbone": "adaptkit.backbone",
    "BackboneSpec": "adaptkit.backbone",
    "fingerprint": "adaptkit.backbone", "compare": "adaptkit.compare", "AdaptkitError": "adaptkit.errors",
    "METHODS": "adaptkit.methods", "get_method": "adaptkit.methods", "Prediction": "adaptkit.inference",
    "Predictor": "adaptkit.inference", "Registry": "adaptkit.registry", "TrainConfig": "adaptkit.training",
    "evaluate": "adaptkit.training", "train": "adaptkit.training",
}
__all__ = ["DEFAULT_BACKBONE", "METHODS", "AdaptkitError", "Backbone", "BackboneSpec", "Prediction", "Predictor",
           "Registry", "TrainConfig", "compare", "create_backbone", "evaluate", "fingerprint", "get_method", "train"]

if TYPE_CHECKING:
    from adaptkit.backbone import DEFAULT_BACKBONE, Backbone, BackboneSpec, create_backbone, fingerprint
    from adaptkit.compare import compare
    from adaptkit.errors import AdaptkitError
    from adaptkit.inference import Prediction, Predictor
    from adaptkit.methods import METHODS, get_method
    from adaptkit.registry import Registry
    from adaptkit.training import TrainConfig, evaluate, train


class _Package(types.ModuleType):
    """Keeps ``adaptkit.train`` and ``adaptkit.compare`` the functions, as an eager import made them, even after
    the import system sets the attribute to the submodule of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("train", "compare") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__getattr__, __dir__ = lazy_names(__name__, _WHERE)
register_with_timm()  # adaptkit's ViTs (the packaged backbone) are timm models once timm is imported
