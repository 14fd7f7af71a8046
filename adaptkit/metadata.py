"""Checks of the descriptive values a file or a data set brings in: class names, data set names, fingerprints and
the data config. Each ``*_problem`` function returns what is wrong (one phrase) or None, so adapter files, registry
rows, PEFT side files and data sources all refuse the same things in their own words.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

__all__ = ["FINGERPRINT", "MAX_CLASSES", "MAX_CLASS_NAME", "MAX_DATASET_NAME", "MAX_INPUT_SIZE", "INTERPOLATIONS",
           "classes_problem", "data_config_problem", "dataset_problem", "fingerprint_problem", "given_fields_problem",
           "text_problem"]

FINGERPRINT = re.compile(r"[0-9a-f]{64}")  # a backbone's fingerprint: a sha256 in hex, nothing else
MAX_CLASSES = 100_000  # ImageNet-21k has 21,843
MAX_CLASS_NAME = 256  # characters
MAX_DATASET_NAME = 1024  # characters: a path or a hub name with its options
MAX_INPUT_SIZE = 2048  # pixels per side: beyond any ViT's input
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
_BIDI = {"\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"}


def text_problem(what: str, value: Any, limit: int) -> str | None:
    """A name shown to people: a string of 1 to ``limit`` characters with no control characters (which would move
    the cursor, colour or rewrite a terminal) and no bidirectional overrides (which reorder what is shown)."""
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string"
    if len(value) > limit:
        return f"{what} {value[:40]!r}... has {len(value):,} characters, more than {limit:,}"
    bad = next((c for c in value if unicodedata.category(c) == "Cc" or c in _BIDI), None)
    if bad is not None:
        return f"{what} {value[:60]!r} holds the control character {bad!r}"
    return None


def classes_problem(classes: Any) -> str | None:
    """A task's class names: a non-empty list of at most MAX_CLASSES unique names, each a :func:`text_problem`-clean
    string of at most MAX_CLASS_NAME characters."""
    if not isinstance(classes, list) or not classes:
        return "classes must be a non-empty list"
    if len(classes) > MAX_CLASSES:
        return f"{len(classes):,} classes, more than {MAX_CLASSES:,}"
    if not all(isinstance(c, str) and c for c in classes):
        return "every class must be a non-empty string"
    problem = next((p for c in classes if (p := text_problem("class name", c, MAX_CLASS_NAME))), None)
    if problem:
        return problem
    return "classes must be unique" if len(set(classes)) != len(classes) else None


def dataset_problem(dataset: Any) -> str | None:
    """A data set spec as recorded with a task: empty, or a clean string of at most MAX_DATASET_NAME characters."""
    if not isinstance(dataset, str):
        return "dataset must be a string"
    return None if dataset == "" else text_problem("dataset", dataset, MAX_DATASET_NAME)


def fingerprint_problem(fingerprint: Any) -> str | None:
    ok = isinstance(fingerprint, str) and FINGERPRINT.fullmatch(fingerprint) is not None
    return None if ok else "backbone_fingerprint must be 64 hex digits"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def data_config_problem(config: Any) -> str | None:
    """timm's data config as adaptkit records it: ``input_size`` (channels 1-4, height and width 1-MAX_INPUT_SIZE)
    and, where present, ``mean`` and ``std`` (one finite number per channel, std positive), ``interpolation`` (one of
    INTERPOLATIONS), ``crop_pct`` in (0, 1] and ``crop_mode``; any other key holds a number, a short string or null."""
    if not isinstance(config, dict):
        return "data_config must be a dict"
    size = config.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(n, int) and not isinstance(n, bool)
                                                               for n in size)
            and 1 <= size[0] <= 4 and all(1 <= n <= MAX_INPUT_SIZE for n in size[1:])):
        return (f"data_config input_size must be [channels 1-4, height, width] with sides of 1 to {MAX_INPUT_SIZE} "
                f"pixels, got {str(size)[:60]}")
    for key in ("mean", "std"):
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == size[0]
                                      and all(_number(x) and (key == "mean" or x > 0) for x in value)):
            return (f"data_config {key} must be {size[0]} finite numbers{' above 0' * (key == 'std')}, "
                    f"got {str(value)[:60]}")
    checks = [
        ("interpolation", lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
        ("crop_pct", lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
        ("crop_mode", lambda v: v in CROP_MODES, f"one of {', '.join(CROP_MODES)}"),
    ]
    for key, ok, text in checks:
        if key in config and not ok(config[key]):
            return f"data_config {key} must be {text}, got {str(config[key])[:60]!r}"
    known = {"input_size", "mean", "std", *(k for k, _, _ in checks)}
    for key, value in config.items():
        if key not in known and not (value is None or _number(value) or isinstance(value, bool)
                                     or (isinstance(value, str) and len(value) <= 64)):
            return f"data_config {str(key)[:40]!r} must be a number, a short string or null"
    return None


def given_fields_problem(values: dict[str, Any]) -> str | None:
    """What is wrong with the descriptive fields a side file gives (``backbone``, ``backbone_weights``,
    ``backbone_fingerprint``, ``classes``, ``dataset``, ``data_config``), each checked only where present."""
    checks = {"backbone": lambda v: None if isinstance(v, str) and 0 < len(v) <= 200 else
              "backbone must be a model name",
              "backbone_weights": lambda v: None if isinstance(v, str) and len(v) <= 4096 else
              "backbone_weights must be a weights source",
              "backbone_fingerprint": fingerprint_problem, "classes": classes_problem, "dataset": dataset_problem,
              "data_config": data_config_problem}
    return next((p for key, check in checks.items() if key in values and (p := check(values[key]))), None)
