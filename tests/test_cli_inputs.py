"""Every bad input to every command: one line that says what to do, exit 1 (2 for usage errors), no traceback,
nothing left behind. Driven by TEST_CASES: argv -> expected exit code and a fragment of the message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import PICO
from PIL import Image
from typer.testing import CliRunner

from adaptkit.cli import app
from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

runner = CliRunner()
QUICK = ["--backbone", PICO, "--no-pretrained", "--epochs", "1", "--limit-train", "16", "--limit-eval", "8"]
NO_GPU = not torch.cuda.is_available()

# (argv, exit code, fragment). {reg} is a registry holding task "pets"; {img} a real image; {fifo} a named pipe;
# {dir} a folder; {text} a text file; {one} a data set of one class; {pickle} a checkpoint with a pickled object.
TEST_CASES: list[tuple[list[str], int, str]] = [
    # train: every numeric option checked (finite, in range) before anything slow
    (["train", "-d", "digits", "--seed", "-1"], 1, "seed must be a whole number in [0, 4294967295], got -1"),
    (["train", "-d", "digits", "--epochs", "1000000000000"], 1, "epochs must be a whole number in [1, 10000]"),
    (["train", "-d", "digits", "--backbone", PICO, "--no-pretrained", "--limit-train", "5"], 1,
     "5 training image(s) for 10 classes: every class needs some"),
    (["train", "-d", "digits", "--device", "bogus"], 1, "unknown device 'bogus': use cpu, cuda, cuda:N or mps"),
    (["train", "-d", "digits", "--epochs", "0"], 1, "epochs must be a whole number in [1, 10000]"),
    (["train", "-d", "digits", "--epochs", "1.5"], 2, "Invalid value for '--epochs'"),
    (["train", "-d", "digits", "--batch-size", "0"], 1, "batch_size must be a whole number in [1, 65536]"),
    (["train", "-d", "digits", "--lr", "inf"], 1, "lr must be a finite number greater than 0"),
    (["train", "-d", "digits", "--lr", "nan"], 1, "lr must be a finite number greater than 0"),
    (["train", "-d", "digits", "--lr", "-0.1"], 1, "lr must be a finite number greater than 0"),
    (["train", "-d", "digits", "--lr", "fast"], 1, "bad --lr 'fast': give a number such as 3e-3, or auto"),
    (["train", "-d", "digits", "--weight-decay", "-1"], 1, "weight_decay must be a finite number at least 0"),
    (["train", "-d", "digits", "--warmup-epochs", "nan"], 1, "warmup_epochs must be a finite number"),
    (["train", "-d", "digits", "--label-smoothing", "1"], 1, "label_smoothing must be a finite number in [0, 1)"),
    (["train", "-d", "digits", "--precision", "fp8"], 1, "precision must be one of auto, bf16, fp32"),
    (["train", "-d", "digits", "--num-workers", "-1"], 1, "num_workers must be a whole number in [0, 64]"),
    (["train", "-d", "digits", "--limit-train", "0"], 1, "limit_train must be a whole number at least 1"),
    (["train", "-d", "digits", "--limit-eval", "0"], 1, "limit_eval must be a whole number at least 1"),
    # method settings, checked by the method's config
    (["train", "-d", "digits", "--scale", "nan"], 1, "adapter scale must be a finite number"),
    (["train", "-d", "digits", "--method", "lora", "--alpha", "nan"], 1, "lora alpha must be a finite number"),
    (["train", "-d", "digits", "--rank", "100000000"], 1, "adapter rank must be a whole number in [1, 4096]"),
    (["train", "-d", "digits", "--rank", "0"], 1, "adapter rank must be a whole number in [1, 4096]"),
    (["train", "-d", "digits", "--method", "lora", "--rank", "-3"], 1, "lora rank must be a whole number"),
    (["train", "-d", "digits", "--method", "lora", "--targets", "qkv,bogus"], 1, "lora targets must be some of"),
    (["train", "-d", "digits", "--placement", "inside"], 1, "placement must be one of parallel, sequential"),
    (["train", "-d", "digits", "--method", "Adaptr"], 1, "unknown method 'Adaptr': did you mean 'adapter'?"),
    (["train", "-d", "digits", "--method", "linear", "--rank", "4"], 1, "--rank does not apply to method 'linear'"),
    # names: a typo is answered with the closest names, never with "train it"
    (["train", "-d", "digts", *QUICK], 1, "unknown data set 'digts': did you mean 'digits'"),
    (["train", "-d", "{dir}", *QUICK], 1, "is a folder: write folder:"),
    (["train", "-d", "folder:{tmp}/nowhere", *QUICK], 1, "does not exist or is not a folder"),
    (["train", "-d", "folder:{one}", *QUICK], 1, "a classifier needs two or more"),
    (["train", "-d", "digits", "--task", "a/b", *QUICK], 1, "bad task name 'a/b'"),
    (["train", "-d", "digits", "--task", "", *QUICK], 1, "task must be a name"),
    (["train", "-d", "folder:", *QUICK], 1, "folder: needs the path of a folder of class folders"),
    (["train", "-d", "digits", "--backbone", PICO, "--weights", "{text}"], 1,
     "is neither a safetensors file nor a torch checkpoint"),
    (["train", "-d", "digits", "--backbone", PICO, "--weights", "{dir}"], 1, "dir is a folder: pass the path"),
    (["train", "-d", "digits", "--backbone", "vit_cifar_tiny_patch4_32.adaptkit_c1"], 1,
     "has no weights tagged 'adaptkit_c1': did you mean vit_cifar_tiny_patch4_32.adaptkit_c10"),
    (["train", "-d", "digits", "--backbone", "vit_pico_patch4_23", "--no-pretrained"], 1,
     "unknown backbone 'vit_pico_patch4_23': did you mean vit_pico_patch4_32"),
    (["train", "-d", "digits", "--backbone", "resnet18", "--no-pretrained"], 1, "not a Vision Transformer"),
    (["train", "-d", "digits", "--backbone", PICO, "--weights", "{tmp}/none.pth"], 1, "none.pth does not exist"),
    (["train", "-d", "digits", "--backbone", PICO, "--weights", "{pickle}"], 1,
     "holds Python objects besides tensors, which adaptkit does not run"),
    # predict: only regular files are read; versions and devices checked
    (["predict", "pets", "{fifo}"], 1, "is not a regular file (a pipe, socket or device)"),
    (["predict", "pets", "{dir}"], 1, "is a folder, not an image"),
    (["predict", "pets", "{tmp}/none.png"], 1, "none.png does not exist"),
    (["predict", "pets", "{text}"], 1, "is not an image"),
    (["predict", "pets@²", "{img}"], 1, "bad version in 'pets@²'"),
    (["predict", "pets@7", "{img}"], 1, "task 'pets' has no version 7 (versions: 1)"),
    (["predict", "pest", "{img}"], 1, "no task 'pest' in the registry: did you mean 'pets'?"),
    (["predict", "zzz", "{img}"], 1, "no task 'zzz' in the registry (tasks: pets)"),
    (["predict", "pets", "{img}", "--device", "bogus"], 1, "unknown device 'bogus'"),
    (["predict", "pets", "{img}", "--topk", "0"], 1, "topk must be a whole number at least 1"),
    (["predict", "pets"], 1, "no images given: adaptkit predict [--task TASK] IMAGE..."),
    (["predict"], 2, "Missing argument '[TASK] IMAGE...'"),
    # eval, show, remove, default, export, import
    (["eval", "pets", "--split", "train"], 1, "split must be test or val, got 'train'"),
    (["eval", "pets", "--batch-size", "0"], 1, "batch_size must be a whole number at least 1"),
    (["eval", "pets", "--limit", "0"], 1, "limit must be a whole number at least 1"),
    (["show", "pets@x"], 1, "bad version in 'pets@x'"),
    (["show", "Pets"], 1, "did you mean 'pets'?"),
    (["remove", "pest", "--yes"], 1, "did you mean 'pets'?"),
    (["default", "pets@3"], 1, "task 'pets' has no version 3"),
    (["export", "pets", "{tmp}/missing/x.safetensors"], 1, "does not exist: create it first"),
    (["import", "{text}"], 1, "not a readable adapter file"),
    (["import", "{tmp}/none.safetensors"], 1, "is missing"),
    (["ui", "--port", "70000"], 1, "--port must be a whole number in [1, 65535]"),
    # usage errors: one line, exit 2
    (["lst"], 2, "No such command 'lst'. Did you mean 'list'?"),
    (["train", "--bogus"], 2, "No such option: --bogus"),
    (["show"], 2, "Missing argument 'TASK[@N]'"),
]
NEEDS_NO_GPU = [
    (["train", "-d", "digits", "--device", "cuda"], 1, "has no CUDA device that torch can use"),
    (["predict", "pets", "{img}", "--device", "cuda"], 1, "has no CUDA device that torch can use"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, cifar_mini) -> dict[str, str]:
    """A registry with one task, and the odd files the cases name."""
    tmp = tmp_path_factory.mktemp("inputs")
    reg = tmp / "registry.db"
    cfg = TrainConfig(epochs=1, batch_size=8, limit_train=16, limit_eval=8)
    train(f"folder:{cifar_mini}", task="pets", backbone=PICO, pretrained=False, config=cfg, registry=Registry(reg))
    fifo = tmp / "pipe.png"
    os.mkfifo(fifo)
    (tmp / "dir").mkdir()
    (tmp / "notes.png").write_text("not an image")
    one = tmp / "one" / "cats"
    one.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(one / f"{i}.png")

    class Payload:
        def __reduce__(self):
            return (print, ("a pickle ran code",))

    torch.save({"w": Payload()}, tmp / "evil.pth")
    img = next((cifar_mini / "test" / "cat").iterdir()) if (cifar_mini / "test").is_dir() else \
        next(p for p in cifar_mini.rglob("*.png"))
    return {"reg": str(reg), "tmp": str(tmp), "fifo": str(fifo), "dir": str(tmp / "dir"),
            "text": str(tmp / "notes.png"), "one": str(tmp / "one"), "pickle": str(tmp / "evil.pth"), "img": str(img)}


def _run(argv: list[str], files: dict[str, str]):
    args = [a.format(**files) for a in argv]
    if args[0] not in ("lst", "ui") and "--bogus" not in args:
        args += ["--registry", files["reg"]]
    return runner.invoke(app, args)


def _files(root: str) -> list[Path]:
    """Every path under ``root`` but SQLite's -wal and -shm files, which come and go with connections."""
    return sorted(p.relative_to(root) for p in Path(root).rglob("*") if not p.name.endswith(("-wal", "-shm")))


def _check(argv: list[str], code: int, fragment: str, files: dict[str, str]) -> None:
    before = _files(files["tmp"])
    result = _run(argv, files)
    assert result.exit_code == code, result.output
    assert fragment.format(**files) in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output  # one line
    assert _files(files["tmp"]) == before  # nothing left behind


@pytest.mark.parametrize(("argv", "code", "fragment"), TEST_CASES, ids=[" ".join(c[0]) for c in TEST_CASES])
def test_bad_input_is_one_line(files, argv, code, fragment):
    _check(argv, code, fragment, files)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize(("argv", "code", "fragment"), NEEDS_NO_GPU, ids=[" ".join(c[0]) for c in NEEDS_NO_GPU])
def test_missing_gpu_is_one_line(files, argv, code, fragment):
    _check(argv, code, fragment, files)


def test_a_folder_given_as_the_registry_is_refused(tmp_path):
    result = runner.invoke(app, ["list", "--registry", str(tmp_path)])
    assert result.exit_code == 1
    assert f"registry {tmp_path} is a folder: give the registry's file, e.g. --registry {tmp_path / 'registry.db'}" \
        in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []
