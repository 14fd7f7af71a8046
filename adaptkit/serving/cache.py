"""An adapter cache over a :class:`~adaptkit.inference.Predictor`: a byte budget, least-recently-used eviction,
prefetch.

A server with thousands of tasks keeps only the adapters it uses often attached to its backbone. Each batch makes
its own tasks resident, then evicts the least recently used others until the adapters fit ``cache_mb``; a batch's
own tasks are never evicted for it, so a batch that needs more than the budget runs whole and the cache shrinks
back at the next one. :meth:`AdapterCache.prefetch` hands the tasks of requests still waiting for a batch to a
background thread, which resolves them against the registry and reads their files (bytes, sha256 check, tensors)
while the current batch computes; the next batch then only attaches tensors already read, so a cold task costs a
file read that overlaps compute instead of stalling the batch (attaching, module construction, stays on the batch).

One lock (:attr:`AdapterCache.lock`) covers the cache's bookkeeping: making a batch's tasks resident and evicting
others. The forward passes run outside it, so batches from many threads compute at once (the predictor needs no
lock to predict); each batch pins its tasks until it is done, so no other batch evicts them under it (while batches
are in flight the resident adapters may exceed the budget by what they pin). The prefetch thread never takes the
lock, so its reads overlap the batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any

from adaptkit.artifacts import AdapterMeta
from adaptkit.checks import check_float
from adaptkit.errors import AdaptkitError, ConfigError, param, step
from adaptkit.inference import DEFAULT_ROUTER, Prediction, Predictor, RoutedPrediction
from adaptkit.registry import Registry, VersionRow
from adaptkit.serving.staging import Staging

__all__ = ["AdapterCache", "CacheStats"]

_log = logging.getLogger(__name__)
_MB = 2 ** 20


@dataclass(frozen=True)
class CacheStats:
    """What the cache has done: per request, a ``hit`` (its adapter was resident) or a ``miss``; of the misses,
    ``prefetched`` found the file already read and ``cold_reads`` read it while the batch waited."""

    hits: int
    misses: int
    prefetched: int
    cold_reads: int
    evictions: int
    resident: int  # adapters attached now
    resident_mb: float
    budget_mb: float
    staged: int  # files read ahead, waiting for their batch

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": round(self.hit_rate, 4)}


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class AdapterCache:
    """Keep at most ``cache_mb`` of adapters attached to the predictor's backbone(s), least recently used out first.

    The cache takes over ``predictor``: from then on load and unload through the cache (or hold :attr:`lock`), and
    do not swap its ``registry``.

    Args:
        predictor: the predictor whose backbone the adapters attach to.
        cache_mb: the budget of resident adapter tensors (their routing statistics included), in MiB; 0 keeps only
            the tasks of the batch being computed.
        prefetch: read the files of :meth:`prefetch`-ed tasks in a background thread.
        resolve_ttl_s: how long a task name's resolution (``task`` -> ``task@N``, one registry query) is reused; a
            new default version is seen within this time, without a restart.
        max_staged: files read ahead and not yet used that are kept (the oldest go first).
    """

    def __init__(self, predictor: Predictor, cache_mb: float = 256.0, *, prefetch: bool = True,
                 resolve_ttl_s: float = 1.0, max_staged: int = 256) -> None:
        check_float("cache_mb", cache_mb, 0)
        check_float("resolve_ttl_s", resolve_ttl_s, 0)
        self.predictor = predictor
        self.registry: Registry = predictor.registry
        predictor.registry = Staging(self.registry, self)  # type: ignore[assignment]
        self.budget = int(cache_mb * _MB)
        self.resolve_ttl_s = resolve_ttl_s
        self.max_staged = max_staged
        self.lock = threading.RLock()  # held while tasks are made resident or evicted
        self._pins: Counter[str] = Counter()  # the tasks of the batches in flight, which evict() keeps
        self._meta = threading.Lock()  # guards the small tables below
        self._rows: dict[str, tuple[float, VersionRow]] = {}  # ref -> (when resolved, row)
        self._resident: OrderedDict[str, tuple[str, int, Any]] = OrderedDict()  # task@N -> (sha256, bytes, task)
        self._bytes = 0
        self._staged: OrderedDict[str, tuple[str | None, dict, AdapterMeta]] = OrderedDict()  # sha256 -> read file
        self._reading: dict[str, threading.Event] = {}  # sha256 -> set when the prefetcher's read ends
        self._sizes: dict[str, int] = {}  # sha256 -> bytes of the last file read
        self._counts = dict.fromkeys(("hits", "misses", "prefetched", "cold_reads", "evictions"), 0)
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._pending: set[str] = set()
        self._tasks: tuple[float, list] | None = None  # (when listed, the tasks routing chooses from)
        self._thread: threading.Thread | None = None
        if prefetch:
            self._thread = threading.Thread(target=self._prefetch_loop, name="adaptkit-prefetch", daemon=True)
            self._thread.start()

    # -- resolving and reading ahead ---------------------------------------------------------------------------

    def resolve(self, ref: str) -> VersionRow:
        """The registry row ``ref`` (``task`` or ``task@N``) names now, reused for ``resolve_ttl_s``.

        Raises:
            NotFoundError: no such task or version; RegistryError: it is broken.
        """
        now = time.monotonic()
        row = self.fresh(ref, now)
        if row is not None:
            return row
        row = self.registry.get_version(ref)
        with self._meta:
            self._rows[ref] = self._rows[row.ref] = (now, row)
        return row

    def fresh(self, ref: str, now: float | None = None) -> VersionRow | None:
        """The row ``ref`` resolved to less than ``resolve_ttl_s`` ago, or None (then :meth:`resolve` queries)."""
        with self._meta:
            known = self._rows.get(ref)
        if known is not None and (now or time.monotonic()) - known[0] < self.resolve_ttl_s:
            return known[1]
        return None

    def prefetch(self, refs: list[str]) -> None:
        """Read the files of ``refs`` in the background (those not resident or read yet); returns at once.

        Resident ones count as used now, so that the batch running meanwhile does not evict them.
        """
        if self._thread is None:
            return
        with self._meta:  # the row last resolved, however long ago: only the order of eviction depends on it
            for _, row in filter(None, (self._rows.get(r) for r in refs)):
                if self._resident.get(row.ref, ("",))[0] == row.sha256:
                    self._resident.move_to_end(row.ref)
            new = [r for r in dict.fromkeys(refs) if r not in self._pending]
            self._pending.update(new)
        for ref in new:
            self._queue.put(ref)

    def _prefetch_loop(self) -> None:
        while (ref := self._queue.get()) is not None:
            with self._meta:
                self._pending.discard(ref)
            try:
                row = self.resolve(ref)
            except AdaptkitError:
                continue  # the request's own batch says what is wrong
            sha, fp = row.sha256, row.backbone.fingerprint
            with self._meta:
                if sha in self._staged or sha in self._reading or self._resident.get(row.ref, ("",))[0] == sha:
                    continue
                done = self._reading[sha] = threading.Event()
            try:
                state, meta = self.registry.load_version(row, fingerprint=fp, device=self.predictor.device)
                with self._meta:
                    self._staged[sha] = (fp, state, meta)
                    while len(self._staged) > self.max_staged:
                        self._staged.popitem(last=False)
            except Exception:  # noqa: BLE001 - the batch reads it again and reports the error for its requests
                _log.debug("prefetch of %s failed", ref, exc_info=True)
            finally:
                with self._meta:
                    self._reading.pop(sha, None)
                done.set()

    def _read_for_batch(self, row: VersionRow, fingerprint: str | None, device: Any) -> tuple[dict, AdapterMeta]:
        """A file the predictor needs now: the prefetcher's read (waiting for it if under way), or one read here."""
        with self._meta:
            reading = self._reading.get(row.sha256)
        if reading is not None:
            reading.wait()
        with self._meta:
            staged = self._staged.pop(row.sha256, None)
        if staged is not None and (fingerprint is None or staged[0] == fingerprint):
            state, meta = staged[1], staged[2]
            key = "prefetched"
        else:
            state, meta = self.registry.load_version(row, fingerprint=fingerprint, device=device)
            key = "cold_reads"
        with self._meta:
            self._counts[key] += 1
            self._sizes[row.sha256] = _nbytes(state)
        return state, meta

    # -- making tasks resident ---------------------------------------------------------------------------------

    def use(self, ref: str, pinned: set[str] | None = None) -> str:
        """Make ``ref`` resident for the batch being put together; returns its ``task@N``.

        Args:
            ref: ``task`` or ``task@N``.
            pinned: the batch's tasks so far; ``ref``'s is added, and :meth:`evict` keeps them.
        """
        row = self.resolve(ref)
        key, sha = row.ref, row.sha256
        with self.lock:
            with self._meta:
                have = self._resident.get(key)
                if have is not None and have[0] == sha:
                    self._resident.move_to_end(key)
                    self._counts["hits"] += 1
            if have is None or have[0] != sha:
                if have is not None:  # the number names another file now (removed and trained again)
                    self._drop(key)
                task = self.predictor.load(key)
                with self._meta:
                    size = self._sizes.pop(sha, row.bytes)
                    self._resident[key] = (sha, size, task)
                    self._bytes += size
                    self._counts["misses"] += 1
        if pinned is not None:
            pinned.add(key)
        return key

    def evict(self, pinned: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Detach least recently used adapters, except ``pinned``, until the resident ones fit the budget."""
        with self.lock:
            while self._bytes > self.budget:
                victim = next((k for k in self._resident if k not in pinned and not self._pins[k]), None)
                if victim is None:
                    return
                self._drop(victim)
                with self._meta:
                    self._counts["evictions"] += 1

    def _drop(self, key: str) -> None:
        with self._meta:
            _, size, task = self._resident.pop(key)
            self._bytes -= size
        self.predictor.unload(key, keep_sites=True)  # no walk over the trunk per eviction

    def stats(self) -> CacheStats:
        with self._meta:
            return CacheStats(**self._counts, resident=len(self._resident), resident_mb=self._bytes / _MB,
                              budget_mb=self.budget / _MB, staged=len(self._staged))

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    # -- predicting --------------------------------------------------------------------------------------------

    def predict_mixed(self, images: list[Any], refs: list[str], topk: int | list[int] = 5
                      ) -> list[list[Prediction] | Exception]:
        """Each image under its own task, in one backbone pass; a request that fails gets its exception, alone.

        Args:
            images: PIL images (or anything :meth:`Predictor.predict_mixed` takes), one per request.
            refs: one ``task`` or ``task@N`` per image.
            topk: labels per request (one number, or one per request).
        """
        ks = topk if isinstance(topk, list) else [topk] * len(images)
        out: list[Any] = [None] * len(images)
        keys, pinned = {}, set()
        with self.lock:
            for i, ref in enumerate(refs):
                try:
                    keys[i] = self.use(ref, pinned)
                except AdaptkitError as exc:  # a missing, broken or unreadable task fails its own requests only
                    out[i] = exc
            self._pin(pinned)
            self.evict(pinned)
        try:
            ready = list(keys)
            if ready:
                preds = self._isolated(lambda idx: self.predictor.predict_mixed(
                    [images[i] for i in idx], [keys[i] for i in idx], topk=max(ks[i] for i in idx)), ready)
                for i, p in zip(ready, preds, strict=True):
                    out[i] = p if isinstance(p, Exception) else p[:ks[i]]
        finally:
            self._unpin(pinned)
        return out

    def predict_auto(self, images: list[Any], topk: int | list[int] = 5, router: str = DEFAULT_ROUTER
                     ) -> list[RoutedPrediction | Exception]:
        """Route each image to a task, then predict under it; a request that fails gets its exception, alone.

        Every registered task is a candidate, so all of them are resident for the batch (a task that cannot be
        loaded is left out of the candidates, with a warning in the log).
        """
        ks = topk if isinstance(topk, list) else [topk] * len(images)
        keys, pinned = [], set()
        with self.lock:
            for t in self._candidates():
                try:
                    keys.append(self.use(t.name, pinned))
                except AdaptkitError as exc:
                    _log.warning("routing leaves out %s: %s", t.name, exc)
            if not keys:
                error = ConfigError(f"no tasks to route to: train one first ({step('train')}) or name a task "
                                    f"({param('task')})")
                return [error] * len(ks)
            self._pin(pinned)
            self.evict(pinned)
        try:
            preds = self._isolated(lambda idx: self.predictor.predict_auto(
                [images[i] for i in idx], topk=max(ks[i] for i in idx), tasks=keys, router=router),
                list(range(len(images))))
        finally:
            self._unpin(pinned)
        return [p if isinstance(p, Exception) else replace(p, predictions=p.predictions[:k])
                for p, k in zip(preds, ks, strict=True)]

    def _pin(self, keys: set[str]) -> None:
        with self._meta:
            self._pins.update(keys)

    def _unpin(self, keys: set[str]) -> None:
        with self._meta:
            self._pins.subtract(keys)
            for k in [k for k in keys if self._pins[k] <= 0]:
                del self._pins[k]

    def _candidates(self) -> list:
        """The registered tasks that have a usable default version, reused for ``resolve_ttl_s``."""
        if self._tasks is not None and time.monotonic() - self._tasks[0] < self.resolve_ttl_s:
            return self._tasks[1]
        tasks = [t for t in self.registry.tasks() if t.default is not None and not t.broken]
        self._tasks = (time.monotonic(), tasks)
        return tasks

    @staticmethod
    def _isolated(run: Any, idx: list[int]) -> list[Any]:
        """``run(idx)`` for the whole batch; if it fails, once per request, so only the failing ones get an error."""
        try:
            return list(run(idx))
        except Exception as exc:  # noqa: BLE001 - which request caused it is found below
            if len(idx) == 1:
                return [exc]
        out: list[Any] = []
        for i in idx:
            try:
                out.append(run([i])[0])
            except Exception as exc:  # noqa: BLE001 - handed to that request alone
                out.append(exc)
        return out
