"""A readers-writer gate for a predictor: many forward passes at once, attaching or detaching a task alone."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["Gate"]


class Gate:
    """Many readers (forward passes) at once, or one writer (a load or an unload, which change a backbone's modules)
    alone.

    A writer waits for the readers inside to leave and lets no new one in meanwhile, so loads are not starved. A
    thread may enter again what it is in already (a read inside a read, a load inside a load), and read while it
    writes; it must not start writing while it reads (that would wait for itself), so load before reading.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # the writing thread's id
        self._depth = 0  # how deep the writer is inside writing()
        self._waiting = 0  # writers waiting for the readers to leave
        self._mine = threading.local()  # this thread's read depth

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        depth = getattr(self._mine, "reads", 0)
        if depth or self._writer == threading.get_ident():  # in already: waiting would wait for itself
            self._mine.reads = depth + 1
            try:
                yield
            finally:
                self._mine.reads = depth
            return
        with self._cond:
            while self._writer is not None or self._waiting:
                self._cond.wait()
            self._readers += 1
        self._mine.reads = 1
        try:
            yield
        finally:
            self._mine.reads = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        me = threading.get_ident()
        if getattr(self._mine, "reads", 0) and self._writer != me:
            raise RuntimeError("a task cannot be loaded inside a forward pass of the same predictor: load it first")
        with self._cond:
            if self._writer == me:
                self._depth += 1
            else:
                self._waiting += 1
                while self._writer is not None or self._readers:
                    self._cond.wait()
                self._waiting -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._writer = None
                    self._cond.notify_all()
