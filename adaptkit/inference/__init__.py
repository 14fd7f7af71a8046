"""Predicting with registered tasks: with a task named (``predictor``: load the backbone once, switch tasks, mix tasks
in a batch) or with none (``routed``: the image's task found by the ``router`` from each task's ``routing_stats``,
images that fit no task rejected), the result types (``results``), and class-incremental evaluation (``continual``).

The public names are imported on first use (PEP 562), as in :mod:`adaptkit.training`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.lazy import lazy_names

_WHERE: dict[str, str] = {}
for _module, _names in {
    "results": ("FrozenPrefix", "ImageLike", "LoadedTask", "Prediction", "Route", "RoutedPrediction",
                "left_out_note"),
    "predictor": ("Predictor", "default_device"),
    "routed": ("AutoPredict",),
    "router": ("DEFAULT_ROUTER", "DEFAULT_SHRINKAGE", "ROUTERS", "Router", "Routes", "oas_shrinkage"),
    "routing_stats": ("CALIBRATION_IMAGES", "DEFAULT_REJECT_RATE", "OOD_SHRINKAGE", "ROUTING_PREFIX", "Calibration",
                      "RoutingStats", "Whitener", "accumulate_stats", "check_reject_rate", "collect_stats",
                      "collect_task_stats", "frozen", "split_state", "task_stats_from_features"),
    "continual": ("ContinualReport", "compare_routers", "evaluate_continual", "fit_routing", "task_order"),
}.items():
    _WHERE.update(dict.fromkeys(_names, _module))
__all__ = ["AutoPredict", "CALIBRATION_IMAGES", "Calibration", "ContinualReport", "DEFAULT_REJECT_RATE",
           "DEFAULT_ROUTER", "DEFAULT_SHRINKAGE", "FrozenPrefix", "ImageLike", "LoadedTask", "OOD_SHRINKAGE",
           "Prediction", "Predictor", "ROUTERS", "ROUTING_PREFIX", "Route", "RoutedPrediction", "Router", "Routes",
           "RoutingStats", "Whitener", "accumulate_stats", "check_reject_rate", "collect_stats", "collect_task_stats",
           "compare_routers", "default_device", "evaluate_continual", "fit_routing", "frozen", "left_out_note",
           "oas_shrinkage", "split_state", "task_order", "task_stats_from_features"]

if TYPE_CHECKING:
    from adaptkit.inference.continual import (
        ContinualReport,
        compare_routers,
        evaluate_continual,
        fit_routing,
        task_order,
    )
    from adaptkit.inference.predictor import Predictor, default_device
    from adaptkit.inference.results import (
        FrozenPrefix,
        ImageLike,
        LoadedTask,
        Prediction,
        Route,
        RoutedPrediction,
        left_out_note,
    )
    from adaptkit.inference.routed import AutoPredict
    from adaptkit.inference.router import DEFAULT_ROUTER, DEFAULT_SHRINKAGE, ROUTERS, Router, Routes, oas_shrinkage
    from adaptkit.inference.routing_stats import (
        CALIBRATION_IMAGES,
        DEFAULT_REJECT_RATE,
        OOD_SHRINKAGE,
        ROUTING_PREFIX,
        Calibration,
        RoutingStats,
        Whitener,
        accumulate_stats,
        check_reject_rate,
        collect_stats,
        collect_task_stats,
        frozen,
        split_state,
        task_stats_from_features,
    )


__getattr__, __dir__ = lazy_names(__name__, {name: f"{__name__}.{module}" for name, module in _WHERE.items()})
