"""Typed errors. The library raises these; the CLI and the app print their message and carry on.

Every message says what went wrong and what to do about it. Where the remedy is a setting, the message names it with
:func:`param` (``param("weights")``, ``param("pretrained", False)``): ``str(error)`` words it as the Python parameter
(``weights``, ``pretrained=False``), and each front end words it for its own users with :meth:`AdaptkitError.worded`
(the command line: ``--weights FILE``, ``--no-pretrained``; the page: its field's label).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MARK = "\x1f"
_PARAM = re.compile(f"{_MARK}(!?[A-Za-z_][A-Za-z0-9_]*)(?:=([^{_MARK}]*))?{_MARK}")

#: how a front end words a setting: (Python parameter name, the value given or None) -> its words, or None for the
#: default wording
Words = Callable[[str, "str | None"], "str | None"]


def param(name: str, value: object = None) -> str:
    """A setting named in an error message, by its Python parameter name (and the value to give it, if any)."""
    return f"{_MARK}{name}{'' if value is None else '=' + str(value)}{_MARK}"


def step(action: str, target: str | None = None) -> str:
    """A thing to do named in an error message, e.g. ``step("train", "pets")``: train a task (named ``pets``);
    ``step("routing_fit", "a b")``: compute those tasks' routing statistics. Front ends word it as their own way of
    doing it (the CLI: a command; the page: a tab)."""
    return param(f"!{action}", target)


#: the steps messages name, as Python calls: (with no target, with one)
_PYTHON_STEPS = {
    "train": ("adaptkit.train.train(...)", "adaptkit.train.train(..., task={name!r})"),
    "routing_fit": ("adaptkit.inference.fit_routing()", "adaptkit.inference.fit_routing({names!r})"),
    "routing_refit": ("adaptkit.inference.fit_routing(force=True)",
                      "adaptkit.inference.fit_routing({names!r}, force=True)"),
}


def python_words(name: str, value: str | None) -> str:
    """The Python API's wording: ``name`` or ``name=value`` (a step: the call that does it)."""
    if name.startswith("!"):
        bare, aimed = _PYTHON_STEPS.get(name[1:], (f"{name[1:]}(...)", f"{name[1:]}({{names!r}})"))
        targets = value.split() if value else []
        return "`" + (aimed.format(name=targets[0], names=targets) if targets else bare) + "`"
    return name if value is None else f"{name}={value}"


def render(message: str, words: Words | None = None) -> str:
    """``message`` with every :func:`param` worded by ``words`` (falling back to the Python wording)."""
    def word(m: re.Match) -> str:
        said = words(m[1], m[2]) if words else None
        return said if said is not None else python_words(m[1], m[2])

    return _PARAM.sub(word, message)


class AdaptkitError(Exception):
    """Base class of every error adaptkit raises on purpose."""

    def __str__(self) -> str:
        return render(super().__str__())

    def worded(self, words: Words) -> str:
        """The message with its settings named as a front end names them (see :func:`param`)."""
        return render(super().__str__(), words)


class ConfigError(AdaptkitError, ValueError):
    """A setting is out of range or inconsistent."""


class BackboneError(AdaptkitError):
    """A backbone cannot be built or its weights cannot be loaded."""


class OfflineError(BackboneError):
    """Pretrained weights are not cached and the hub cannot be reached."""


class DatasetError(AdaptkitError):
    """A data set cannot be found, read or split."""


class ImageError(AdaptkitError):
    """A file given as an image cannot be read as one."""


class ArtifactError(AdaptkitError):
    """An adapter file is missing, corrupt, or made for another backbone."""


class RegistryError(AdaptkitError):
    """A registry row is missing or a change to the registry failed."""


class NotFoundError(RegistryError):
    """A task, version or backbone is not in the registry."""


class DivergedError(AdaptkitError):
    """Training produced a non-finite loss or parameter; nothing was saved."""


class RoutingError(AdaptkitError):
    """Prediction with no task name is not possible: a task lacks routing statistics."""
