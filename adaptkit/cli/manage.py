"""Commands that change the registry: `remove`, `default`, `export`, `import`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from adaptkit.cli.common import AdaptersOpt, RegistryOpt, app, echo, friendly, registry_of
from adaptkit.errors import ConfigError


@app.command()
@friendly
def remove(
    ref: Annotated[str, typer.Argument(metavar="TASK[@N]", help="A task (every version) or one version TASK@N",
                                       show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Remove a task or one of its versions, with its adapter file."""
    reg = registry_of(registry, adapters)
    reg.get_version(ref, allow_broken=True)  # a broken version can always be removed
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"removing {ref} deletes its adapter file(s): pass --yes to confirm")
        typer.confirm(f"remove {ref} and its adapter file(s)?", abort=True)
    removed = reg.remove(ref)
    echo(f"removed {', '.join(removed)}")


@app.command()
@friendly
def default(ref: Annotated[str, typer.Argument(metavar="TASK@N", help="The version to make the default",
                                              show_default=False)], registry: RegistryOpt = None,
            adapters: AdaptersOpt = None) -> None:
    """Make a version its task's default."""
    v = registry_of(registry, adapters).set_default(ref)
    echo(f"{v.ref} is now the default of {v.task.name}")


FORMATS = ("adaptkit", "peft", "onnx")


@app.command()
@friendly
def export(
    ref: Annotated[str, typer.Argument(metavar="TASK[@N]", help="A task (its default version) or TASK@N; for "
                                       "--format onnx, several joined by commas make one graph", show_default=False)],
    file: Annotated[Path, typer.Argument(metavar="DEST", help="Destination file or folder", show_default=False)],
    fmt: Annotated[str | None, typer.Option("--format", "-f", metavar="FORMAT",
                                            help="adaptkit (a .safetensors adapter file), peft (a PEFT adapter "
                                            "folder) or onnx (one graph: image -> logits) [default: onnx for a "
                                            ".onnx DEST, else adaptkit]", show_default=False)] = None,
    opset: Annotated[int | None, typer.Option(metavar="N", help="ONNX opset [default: the exporter's]",
                                              show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file")] = False,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Write a version as a file to use elsewhere: adaptkit's own, PEFT's or ONNX.

    adaptkit's file describes itself (task, classes, method, backbone), so `adaptkit import` needs nothing else. A PEFT
    folder loads with PeftModel.from_pretrained on the timm backbone; an ONNX graph runs in onnxruntime, its classes
    and data config in its metadata.
    """
    fmt = (fmt or ("onnx" if file.suffix.lower() == ".onnx" else "adaptkit")).strip().lower()
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if opset is not None and fmt != "onnx":
        raise ConfigError("--opset is for --format onnx only")
    refs = [r.strip() for r in ref.split(",")]
    if len(refs) > 1 and fmt != "onnx":
        raise ConfigError(f"several tasks make one file only with --format onnx: export {refs[0]} alone, or pass "
                          "--format onnx")
    if any(not r for r in refs):
        raise ConfigError(f"empty task name in {ref!r}: separate task names by single commas")
    reg = registry_of(registry, adapters)
    if fmt == "adaptkit":
        dest = reg.export(ref, file, overwrite=force)
    elif fmt == "peft":
        from adaptkit.interop.peft import export_peft

        dest = export_peft(reg, ref, file, overwrite=force)
    elif len(refs) > 1:
        from adaptkit.interop.onnx import export_onnx_registry

        dest = export_onnx_registry(reg, file, refs, overwrite=force, opset=opset)
    else:
        from adaptkit.interop.onnx import export_onnx

        dest = export_onnx(reg, ref, file, overwrite=force, opset=opset)
    echo(f"exported {ref} to {dest} ({fmt})")


@app.command("import")
@friendly
def import_file(
    file: Annotated[Path, typer.Argument(metavar="PATH", help="An exported adapter .safetensors file, or a PEFT "
                                         "LoRA adapter folder (adapter_config.json)", show_default=False)],
    task: Annotated[str | None, typer.Option(metavar="NAME", help="Register under this task name [default: the "
                                             "file's, or the PEFT folder's name]")] = None,
    classes: Annotated[str | None, typer.Option(metavar="LIST", help="PEFT folders: the class names, "
                                                "comma-separated, in the head's order")] = None,
    labels_file: Annotated[Path | None, typer.Option(metavar="FILE", help="PEFT folders: the class names, one "
                                                     "per line")] = None,
    backbone: Annotated[str | None, typer.Option(metavar="NAME", help="PEFT folders: the timm ViT it was "
                                                 "trained on [default: adaptkit.json's, or the adapter's "
                                                 "base_model_name_or_path]")] = None,
    weights: Annotated[Path | None, typer.Option(metavar="FILE", help="PEFT folders: local weights of that "
                                                 "backbone instead of the hub")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="PEFT folders: --no-pretrained "
                                             "for a backbone with random weights (trained on no data)")] = True,
    registry: RegistryOpt = None,
    adapters: AdaptersOpt = None,
) -> None:
    """Add an exported adapter file, or a PEFT LoRA folder trained on a timm ViT, to this registry as a new
    version."""
    reg = registry_of(registry, adapters)
    if file.is_dir():
        from adaptkit.interop.peft import import_peft

        if (weights is not None or not pretrained) and backbone is None:
            given = "--weights" if weights is not None else "--no-pretrained"
            raise ConfigError(f"{given} needs --backbone NAME: the timm ViT those weights are for")
        if weights is not None or not pretrained:
            from adaptkit.backbone import create_backbone

            chosen: object = create_backbone(backbone, weights=None if weights is None else str(weights),
                                             pretrained=pretrained, device="cpu")
        else:
            chosen = backbone
        v = import_peft(reg, file, task=task, classes=classes, labels_file=labels_file, backbone=chosen)
        echo(f"imported PEFT adapter {file} as {v.ref}")
        return
    extra = [name for name, value in (("--classes", classes), ("--labels-file", labels_file),
                                      ("--backbone", backbone), ("--weights", weights),
                                      ("--no-pretrained", None if pretrained else True)) if value is not None]
    if extra:
        raise ConfigError(f"{', '.join(extra)} apply to PEFT adapter folders; {file} is a file, which names its "
                          "own classes and backbone")
    v = reg.import_file(file, task=task)
    echo(f"imported {file} as {v.ref}")
