"""``from adaptkit.predict import Predictor``, as the README shows it, kept working: the code is in
:mod:`adaptkit.inference` (``predictor``, ``results``, ``routed``)."""

from adaptkit.inference.predictor import Predictor, default_device
from adaptkit.inference.results import LoadedTask, Prediction, Route, RoutedPrediction

__all__ = ["Predictor", "Prediction", "RoutedPrediction", "Route", "LoadedTask", "default_device"]
