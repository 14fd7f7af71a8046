"""Typed errors. The library raises these; the CLI and the app print their message and carry on.

Every message says what went wrong and what to do about it.
"""


class AdaptkitError(Exception):
    """Base class of every error adaptkit raises on purpose."""


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
