"""The command line starts fast: importing it, `--help` and `list` never import torch, timm or gradio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "timm", "gradio", "torchvision", "safetensors.torch")
ROOT = Path(__file__).resolve().parents[1]


def imported_after(code: str) -> set[str]:
    """The modules (among HEAVY and sqlalchemy) that a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.splitlines()[-1])) & {*HEAVY, "sqlalchemy"}


def test_importing_the_cli_imports_no_torch():
    assert imported_after("import adaptkit.cli") == set()


def test_package_names_are_imported_on_first_use():
    assert imported_after("import adaptkit; adaptkit.AdaptkitError") == set()
    assert "torch" in imported_after("import adaptkit; adaptkit.Predictor")
    assert imported_after("import adaptkit; adaptkit.TrainConfig") == set()  # the CLI reads its settings


def test_train_and_compare_stay_functions_after_their_modules_are_imported():
    import adaptkit
    import adaptkit.compare
    import adaptkit.train

    assert callable(adaptkit.train) and adaptkit.train.__name__ == "train"
    assert callable(adaptkit.compare) and adaptkit.compare.__name__ == "compare"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["list", "--registry", "{tmp}/r.db"]])
def test_commands_that_read_do_not_import_torch(tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = ("import sys\nfrom adaptkit.cli import app\n"
            f"try:\n    app({argv!r}, standalone_mode=False)\nexcept SystemExit:\n    pass")
    assert imported_after(code) & set(HEAVY) == set()


@pytest.mark.parametrize("code", ["import adaptkit\nimport timm", "import timm\nimport adaptkit",
                                  "import adaptkit\nfrom timm.models import create_model\nimport timm"])
def test_import_adaptkit_registers_its_vits_with_timm_whichever_comes_first(code):
    probe = f"{code}\nprint(timm.is_model('vit_cifar_tiny_patch4_32'), timm.is_model('vit_pico_patch4_32'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stderr
    assert imported_after("import adaptkit") == set()  # and timm is not paid for until it is used
