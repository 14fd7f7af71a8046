"""adaptkit: adapt one frozen Vision Transformer to many image tasks with small adapters and a registry."""

from adaptkit.backbone import DEFAULT_BACKBONE, Backbone, create_backbone, fingerprint
from adaptkit.compare import compare
from adaptkit.errors import AdaptkitError
from adaptkit.methods import METHODS, get_method
from adaptkit.predict import Prediction, Predictor
from adaptkit.registry import Registry
from adaptkit.train import TrainConfig, evaluate, train

__version__ = "0.1.0"
__all__ = ["DEFAULT_BACKBONE", "METHODS", "AdaptkitError", "Backbone", "Prediction", "Predictor", "Registry",
           "TrainConfig", "compare", "create_backbone", "evaluate", "fingerprint", "get_method", "train"]
