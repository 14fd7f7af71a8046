"""Recipe files for `adaptkit train --config FILE` and `adaptkit show TASK --recipe`.

A recipe file is YAML (or JSON, which YAML reads too): a mapping whose keys are `adaptkit train`'s options, spelt
as on the command line without the dashes (``batch-size`` or ``batch_size``). Its values become the options'
defaults (click's ``default_map``), so an option given on the command line always wins. A file says what to train
and how (the data, the backbone and its weights, the method, the recipe, the device); where a run keeps and writes
things on this machine (the registry, the adapter store, the trackers' folder, the data sets' download folder) is
the caller's, on the command line or in the environment (:data:`NOT_IN_FILES`). The YAML is plain data: anchors and
aliases, repeated keys and nesting deeper than :data:`MAX_DEPTH` are refused before any value is built.
``show --recipe`` writes the file that trains the same version again: the data, the backbone, the method's
settings and the recipe as it ran (the learning rate the version used, also when ``--lr auto`` chose it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from adaptkit.errors import ConfigError
from adaptkit.settings import default_of
from adaptkit.suggest import did_you_mean
from adaptkit.training.config import TrainConfig

__all__ = ["load_config", "recipe_options", "recipe_yaml"]

# where a run keeps and writes things is the caller's to choose, never a file's
NOT_IN_FILES = {"config", "config_file", "registry", "adapters", "log_dir", "data_dir"}
MAX_BYTES = 1 << 20
MAX_DEPTH = 8  # a recipe is a flat mapping; a list value is one level more


def load_config(ctx: typer.Context, param: Any, value: Path | None) -> Path | None:
    """The eager ``--config`` callback: check the file and make its values the other options' defaults."""
    if value is None or ctx.resilient_parsing:
        return value
    values = _read(Path(value))
    options = {p.name: p for p in ctx.command.params if p.name and p.name not in NOT_IN_FILES}
    given: dict[str, Any] = {}
    for raw, item in values.items():
        key = str(raw).strip().replace("-", "_")
        if key not in options:
            known = [n.replace("_", "-") for n in options]
            hint = did_you_mean(str(raw).replace("_", "-"), known)
            where = "is chosen on the command line" if key in NOT_IN_FILES else "is not an option of `train`"
            raise typer.BadParameter(f"{value}: key {raw!r} {where}{': ' + hint if hint else ''}")
        if key in given:
            raise typer.BadParameter(f"{value}: {key.replace('_', '-')} is given twice")
        if item is not None:
            if isinstance(item, (dict, list)) and not getattr(options[key], "multiple", False):
                raise typer.BadParameter(f"{value}: {raw} takes one value, got {type(item).__name__} "
                                     f"{_short(repr(item))}")
            _check_type(options[key], ctx, item, f"{value}: {raw}")
            _check_setting(key, item, f"{value}: {raw}")
            given[key] = item
    ctx.default_map = {**(ctx.default_map or {}), **given}
    return value


_SETTINGS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_setting(key: str, item: Any, where: str) -> None:
    """A number for a recipe setting passes that setting's own check (its range) here, where the file is named."""
    check = _SETTINGS[key].metadata.get("check") if key in _SETTINGS else None
    if check is not None and isinstance(item, (int, float)) and not isinstance(item, bool):
        try:
            check(key, item)
        except ConfigError as exc:
            raise typer.BadParameter(f"{where}: {exc}") from None


def _check_type(param: Any, ctx: typer.Context, item: Any, where: str) -> None:
    """Convert a value as the option would, so that a wrong type is an error naming the file and the key."""
    if isinstance(item, bool) and getattr(param, "is_flag", False):
        return
    if isinstance(item, bool) != (getattr(getattr(param, "type_descriptor", None), "annotation", None) is bool):
        wanted = "number or name" if isinstance(item, bool) else "yes/no"
        raise typer.BadParameter(f"{where}: {item!r} is not a {wanted} value for this option")
    runtime = getattr(param, "get_runtime_param", None)  # Typer's own conversion (Typer >= 0.2x)
    if runtime is None:
        return  # older Typer: click converts it when the option is read
    try:
        runtime().coerce(item, param=param, ctx=ctx)
    except typer.TyperException as exc:
        raise typer.BadParameter(f"{where}: {exc.format_message()}") from None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _RecipeError(Exception):
    """What the recipe loader refuses, said in one line."""


def _recipe_loader() -> type:
    """A safe YAML loader for plain data: no anchors or aliases (a few hundred bytes of nested aliases expand to
    gigabytes), no nesting deeper than MAX_DEPTH, no key given twice."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise _RecipeError(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are "
                                   "not read in recipe files: write each value out")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _RecipeError(f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep: a "
                                   "recipe is a flat mapping of option: value")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise _RecipeError(f"line {line}: key {_short(repr(key), 40)} is given twice (first on line "
                                       f"{seen[key]})")
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = line
            return super().construct_mapping(node, deep)

    return RecipeLoader


def _read(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise typer.BadParameter(f"{path} {'is not a file' if path.exists() else 'does not exist'}")
    if path.stat().st_size > MAX_BYTES:
        raise typer.BadParameter(f"{path} is over {MAX_BYTES >> 20} MiB: a recipe file is a few lines of YAML")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_recipe_loader())  # noqa: S506 (a safe loader)
    except _RecipeError as exc:
        raise typer.BadParameter(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise typer.BadParameter(f"{path} is not valid YAML: {_short(' '.join(str(exc).split()), 300)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of option: value, got a {type(data).__name__}")
    return data


# -- show --recipe -------------------------------------------------------------------------------------------------

_MACHINE = ("device", "num_workers")  # where a run goes, not what it trains: not written into recipe files
_API_ONLY = {name: default_of(TrainConfig, name) for name in ("min_lr_ratio", "grad_clip", "crop_scale",
                                                              "val_fraction")}  # no option of `adaptkit train`
# TrainConfig's other settings, which `adaptkit train` takes as options of the same name
_RECIPE_OPTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in {*_MACHINE, *_API_ONLY})


def recipe_options(version: Any, method_options: dict[str, dict[str, str]]) -> tuple[dict[str, Any], list[str]]:
    """The `train` options that reproduce a registered version, and notes on what options cannot say.

    Args:
        version: a registry ``VersionRow``.
        method_options: per method, CLI option -> the method's setting (``train_cmd.METHOD_OPTIONS``).
    """
    train = version.train or {}
    recipe = train.get("recipe") or {}
    notes: list[str] = []
    opts: dict[str, Any] = {"dataset": version.task.dataset, "task": version.task.name}
    if train.get("classes"):
        opts["classes"] = train["classes"]
    weights = version.backbone.weights
    opts["backbone"] = version.backbone.name
    if weights.startswith("file:"):
        opts["weights"] = weights[len("file:"):]
    opts["pretrained"] = weights != "random"
    from adaptkit.sizes import other_image_size

    size = other_image_size(version.backbone.data_config or {})
    if size is not None:
        opts["image_size"] = size
    opts["method"] = version.method
    by_setting = {setting: option for option, setting in method_options.get(version.method, {}).items()}
    by_setting["blocks"] = "blocks"
    defaults = _method_defaults(version.method)
    for setting, value in (version.config or {}).items():
        if setting in by_setting:
            if value is not None:
                opts[by_setting[setting]] = ",".join(value) if isinstance(value, list) else value
        elif defaults.get(setting, object()) != value:
            notes.append(f"{version.method} {setting}={value!r} is set through the Python API only")
    if (train.get("init_from") or {}).get("ref"):
        opts["init_from"] = train["init_from"]["ref"]
    if not recipe:
        notes.append("this version has no recorded recipe (imported or trained before recipes were kept): "
                     "the options below are train's defaults")
    for name in _RECIPE_OPTIONS:
        if name in recipe:
            opts[name] = recipe[name]
    if recipe.get("lr_given") == "auto":
        notes.append(f"lr {recipe.get('lr')} was chosen by --lr auto; write lr: auto to search again")
    for name, default in _API_ONLY.items():
        if recipe.get(name, default) != default:
            notes.append(f"{name}={recipe[name]!r} is set through the Python API (TrainConfig) only")
    if recipe.get("device"):
        notes.append(f"trained on {recipe['device']}; add device: ... to choose the device")
    for key in ("image_column", "label_column"):
        if train.get(key):
            opts[key] = train[key]
    return opts, notes


def _method_defaults(method: str) -> dict[str, Any]:
    from adaptkit.errors import AdaptkitError
    from adaptkit.methods import get_method

    try:
        return get_method(method).config_dict()
    except AdaptkitError:  # a method this adaptkit does not know: every setting is worth a note
        return {}


def recipe_yaml(version: Any, method_options: dict[str, dict[str, str]]) -> str:
    """A recipe file for ``adaptkit train --config``: comments first, then one ``option: value`` per line."""
    import yaml

    opts, notes = recipe_options(version, method_options)
    head = [f"# adaptkit train --config FILE: trains {version.ref} again", *(f"# note: {n}" for n in notes)]
    body = yaml.safe_dump({k.replace("_", "-"): v for k, v in opts.items()}, sort_keys=False, allow_unicode=True)
    return "\n".join(head) + "\n" + body
