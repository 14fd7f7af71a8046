"""The ``adaptkit`` command line: a thin layer that parses, calls the library and prints.

Every :class:`~adaptkit.errors.AdaptkitError` becomes a one-line message on stderr and exit status 1. Commands are
grouped by job, one module each; importing a module registers its commands on :data:`app`, in the order below.
"""

import importlib

from adaptkit.cli.common import app

for _module in ("train_cmd", "inspect_cmds", "backbones_cmd", "predict_cmds", "continual_cmds", "manage", "ui_cmd",
                "doctor_cmd", "serve_cmd"):
    importlib.import_module(f"adaptkit.cli.{_module}")

__all__ = ["app"]
