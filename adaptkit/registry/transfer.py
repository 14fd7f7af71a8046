"""Moving versions between registries: export a version's checked file, import an exported one as a new version.

:class:`Transfers` is mixed into :class:`~adaptkit.registry.Registry`; it uses the registry's ``exists``,
``session``, ``get_version``, ``add_version`` and ``_stored_bytes``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from sqlalchemy import select

from adaptkit.artifacts import AdapterMeta, adapter_bytes, check_task_name, load_adapter, parse_adapter, write_atomic
from adaptkit.errors import ArtifactError, ConfigError, param
from adaptkit.registry.tables import BackboneRow, TaskRow, VersionRow

__all__ = ["CHECK_PARAMS", "Transfers"]

_log = logging.getLogger(__name__)

CHECK_PARAMS = 6_000_000  # random weights rebuilt at import up to this size (ViT-Ti: about 2 s on one busy core)


class Transfers:
    """Export and import of adapter files (see the module's docstring)."""

    def export(self, ref: str, dest: str | os.PathLike, overwrite: bool = False) -> Path:
        """Copy a version's adapter file to ``dest`` after checking it; it describes itself and can be imported.

        ``dest`` is a file, or a folder that gets ``TASK-vN.safetensors``; its folder must exist.
        """
        version = self.get_version(ref)
        data = self._checked_bytes(version)
        dest = Path(dest).expanduser()
        if dest.is_dir():
            check_task_name(version.task.name)  # a name from the database becomes a file name: prove it plain
            dest = dest / f"{version.task.name}-v{version.version}.safetensors"
        if not dest.parent.is_dir():
            raise ConfigError(f"cannot export to {dest}: folder {dest.parent} does not exist: create it first or "
                              "export somewhere else")
        if dest.exists() and not overwrite:
            raise ConfigError(f"{dest} exists already: pick another path or pass {param('overwrite', True)} to "
                              "overwrite it")
        if dest.exists() and not dest.is_file():
            raise ConfigError(f"{dest} is not a regular file: pick another path")
        try:
            write_atomic(dest, data)
        except OSError as exc:
            raise ConfigError(f"cannot write {dest}: {exc.strerror}") from exc
        return dest

    def _checked_bytes(self, version: VersionRow) -> bytes:
        """A version's file as bytes, after the same checks as loading (never hand out a damaged file)."""
        data, where = self._stored_bytes(version)
        parse_adapter(data, where, sha256=version.sha256)
        return data

    def import_file(self, path: str | os.PathLike, task: str | None = None) -> VersionRow:
        """Add an exported adapter file as the next version of its task (or of ``task``), after checking it whole.

        The file must be a regular file; its metadata and tensors are checked against its method and backbone
        (:func:`adaptkit.registry.validate.check_adapter`). A file identical to a version the task has already is
        refused.
        """
        from adaptkit.registry.validate import check_adapter

        path = Path(path).expanduser()
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            raise ArtifactError(f"{path} {what}: give the path of an exported .safetensors adapter file")
        state, meta = load_adapter(path)
        if task is not None:
            check_task_name(task)
            meta.task = task
        check_adapter(state, meta, str(path))
        self._check_weights_source(meta, path)
        info = {"imported_from": str(path.resolve()), **({"recipe": meta.recipe} if meta.recipe else {})}
        self.check_new(meta, state, str(path))
        doubt = self._backbone_doubt(meta, path)
        version = self.add_version(meta, state, train_info=info)
        if doubt:
            _log.warning("%s: %s", version.ref, doubt)
        return version

    def check_new(self, meta: AdapterMeta, state: dict, where: str) -> None:
        """Refuse an import whose adapter is identical to a version its task has already."""
        if not self.exists:
            return
        sha = hashlib.sha256(adapter_bytes(state, meta)).hexdigest()
        with self.session() as s:
            same = s.scalar(select(VersionRow).join(TaskRow).where(TaskRow.name == meta.task, VersionRow.sha256 == sha))
            if same is not None:
                raise ConfigError(f"{where} is identical to {meta.task}@{same.version} already in this registry: "
                                  "nothing to import")

    def known_backbone(self, fingerprint: str) -> bool:
        """Whether a version of this registry was trained on the backbone with ``fingerprint``."""
        if not self.exists:
            return False
        with self.session() as s:
            return s.scalar(select(BackboneRow.id).where(BackboneRow.fingerprint == fingerprint)) is not None

    def _check_weights_source(self, meta: AdapterMeta, path: Path) -> None:
        """A ``file:`` backbone source from a file is a path on someone else's disk: never read it on trust.

        It is accepted only when this registry knows the backbone already (its own row then says where the
        weights are); otherwise the user registers that backbone first by training with ``--weights``.
        """
        if not meta.backbone_weights.startswith("file:"):
            return
        if not self.known_backbone(meta.backbone_fingerprint):
            raise ArtifactError(f"{path} was trained on {meta.backbone} with weights from a local file "
                                f"({meta.backbone_weights[5:]}) this registry does not know: train any task here "
                                f"with {param('weights')} for that backbone first, then import it")

    def _backbone_doubt(self, meta: AdapterMeta, path: Path) -> str | None:
        """Check a backbone new to this registry where that is cheap, before the first prediction builds it.

        Packaged weights (a file inside timm's or adaptkit's package) are built and a mismatch refused. Seeded random
        weights are the same bits on every machine: up to :data:`CHECK_PARAMS` parameters they are built, and a
        mismatch is returned as a doubt (it may be adaptkit 0.1's random weights, which the first prediction looks
        for); larger ones are not built, and the doubt says what the first prediction will do. Hub weights and
        files are checked by the first prediction only.
        """
        from adaptkit.backbone import create_backbone, describe_weights
        from adaptkit.backbone_info import describe_arch, packaged_weights, pretrained_cfg, recorded_image_size

        fp, weights, name = meta.backbone_fingerprint, meta.backbone_weights, meta.backbone
        if weights not in ("package", "random") or self.known_backbone(fp):
            return None
        if weights == "package" and not packaged_weights(pretrained_cfg(name, registered_only=True)):
            return None
        if weights == "random" and describe_arch(name).params > CHECK_PARAMS:
            return (f"{path} says it was trained on {name} ({describe_weights(weights)}, fingerprint {fp[:12]}), "
                    "new to this registry and too large to rebuild now: the first prediction rebuilds it and "
                    "refuses the task if the weights differ")
        found = create_backbone(name, weights=weights, image_size=recorded_image_size(meta.data_config)).fingerprint
        if found == fp:
            return None
        if weights == "package":
            raise ArtifactError(f"{path} was trained on {name} with packaged weights of fingerprint {fp[:12]}, but "
                                f"this adaptkit's are {found[:12]}: export it again from a registry on this adaptkit "
                                "version, or retrain the task here")
        return (f"{path} says it was trained on {name} (random weights) of fingerprint {fp[:12]}, but adaptkit's "
                f"random weights of {name} are {found[:12]}: unless they are adaptkit 0.1's (the first prediction "
                "looks for those, up to minutes), this task cannot predict here: export it again from the registry "
                "that trained it, or retrain it here")
