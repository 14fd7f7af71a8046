"""The predictor's view of the registry under an :class:`~adaptkit.serving.cache.AdapterCache`: what the cache
already resolved or read ahead is handed over instead of being looked up or read again."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.artifacts import AdapterMeta
from adaptkit.registry import Registry, VersionRow

if TYPE_CHECKING:
    from adaptkit.serving.cache import AdapterCache

__all__ = ["Staging"]


class Staging:
    """The predictor's view of the registry: rows the cache resolved and files the prefetcher read are handed over
    instead of being looked up or read again; everything else goes to the registry itself."""

    def __init__(self, registry: Registry, cache: AdapterCache) -> None:
        self._registry, self._cache = registry, cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    def get_version(self, ref: str, **kwargs: Any) -> VersionRow:
        known = self._cache._rows.get(ref)  # just resolved by the cache for the batch being put together
        return known[1] if known is not None and not kwargs else self._registry.get_version(ref, **kwargs)

    def load_version(self, version: VersionRow, *, fingerprint: str | None = None,
                     device: Any = "cpu") -> tuple[dict, AdapterMeta]:
        return self._cache._read_for_batch(version, fingerprint, device)
