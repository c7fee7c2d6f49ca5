"""The expert cache's loads: one queue, demand first, and the threads that run them.

Demand loads run in arrival order before any prefetch; prefetches (speculative) run only when no
demand is queued, highest predicted score first. A load the compute thread needs while it is
still queued is run on that thread at once (ExpertCache.get), so demand never waits behind
prefetches. At most one task per (layer, expert) is in flight: a demand lookup of an expert whose
prefetch is queued promotes that task to demand.

Every method is called with the cache's lock held (the queue shares its condition variable);
the threads take the lock themselves.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class LoadTask:
    key: tuple[int, int]             # (layer, expert)
    kind: str                        # "demand" | "prefetch"
    score: float = 0.0
    use: float | None = None         # a prefetch's predicted probability of use (admission)
    state: str = "queued"            # queued | running | done
    error: BaseException | None = None
    dropped: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    step: int = 0


class LoadQueue:
    """Tasks by key, the demand FIFO and the prefetch heap."""

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self.tasks: dict[tuple[int, int], LoadTask] = {}
        self._demand: list[LoadTask] = []
        self._prefetch: list[tuple[float, int, LoadTask]] = []
        self._seq = itertools.count()
        self.closed = False

    def enqueue(self, key: tuple[int, int], kind: str, score: float = 0.0, step: int = 0) -> LoadTask:
        task = LoadTask(key, kind, score=score, step=step)
        self.tasks[key] = task
        if kind == "demand":
            self._demand.append(task)
        else:
            heapq.heappush(self._prefetch, (-score, next(self._seq), task))
        self._cond.notify_all()
        return task

    def promote(self, task: LoadTask) -> None:
        """A prefetch the routing now needs: it becomes a demand load (queued ahead of prefetches)."""
        task.kind = "demand"
        if task.state == "queued":
            self._demand.append(task)
            self._cond.notify_all()

    def finish(self, task: LoadTask, error: BaseException | None = None, dropped: bool = False) -> None:
        """Mark `task` done; a failed demand load stays in `tasks` until its waiter collects it."""
        task.state = "done"
        task.error = error
        task.dropped = dropped
        if self.tasks.get(task.key) is task and (error is None or task.kind == "prefetch"):
            del self.tasks[task.key]
        task.done.set()
        self._cond.notify_all()

    def drop_queued_prefetches(self) -> int:
        """Finish (dropped) every prefetch still queued: a new token makes them stale."""
        n = 0
        for _, _, task in self._prefetch:
            if task.state == "queued" and task.kind == "prefetch":
                self.finish(task, dropped=True)
                n += 1
        self._prefetch.clear()
        return n

    def next(self) -> LoadTask | None:
        while self._demand:
            task = self._demand.pop(0)
            if task.state == "queued":
                return task
        while self._prefetch:
            _, _, task = heapq.heappop(self._prefetch)
            if task.state == "queued":
                return task
        return None


class LoaderThreads:
    """`n` daemon threads that take tasks from `queue` (under `lock`) and run them with `run`
    (called without the lock; it finishes the task itself)."""

    def __init__(self, queue: LoadQueue, lock: threading.RLock, cond: threading.Condition,
                 run: Callable[[LoadTask], None], n: int) -> None:
        self.queue, self._lock, self._cond, self._run = queue, lock, cond, run
        self.threads = [threading.Thread(target=self._loop, name=f"expert-loader-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self.queue.closed = True
            self._cond.notify_all()
        for t in self.threads:
            t.join(timeout=timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                task = self.queue.next()
                while task is None:
                    if self.queue.closed:
                        return
                    self._cond.wait()
                    task = self.queue.next()
                task.state = "running"
            try:
                self._run(task)
            except BaseException:  # pragma: no cover - run records its own errors
                log.exception("expert loader crashed on %s", task.key)
