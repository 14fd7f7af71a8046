"""The registry: backbones, tasks and adapter versions in SQL (``db``, ``tables``, ``migrations/``), their files in a
storage (``storage``), the check of a file before it is accepted (``validate``) and repairs (``doctor``)."""

from adaptkit.artifacts import TASK_NAME
from adaptkit.registry.core import Registry, default_url, parse_ref
from adaptkit.registry.housekeeping import OWNER_FILE
from adaptkit.registry.tables import BackboneRow, Base, TaskRow, VersionRow

__all__ = ["Base", "BackboneRow", "TaskRow", "VersionRow", "Registry", "default_url", "parse_ref", "TASK_NAME",
           "OWNER_FILE"]
