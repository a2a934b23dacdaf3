"""A deduplicating, delaying, rate-limited work queue of model keys, drained by a fixed pool of worker threads.

Events and resyncs only enqueue a key (namespace, name); workers reconcile it from the watch caches. As in
controller-runtime's workqueue:

- a key already waiting is not queued twice (a burst of events for one model is one reconcile);
- a key being reconciled is never handed to a second worker: added meanwhile, it is queued again once, when the
  running reconcile is done (so the change that arrived during it is not lost);
- `add_after` schedules a key (resyncs, retries); the earliest schedule of a key wins;
- `add_rate_limited` retries a failed key with a per-key exponential backoff, `forget` resets it;
- `urgent` keys (a model's own change: a new model, a spec edit) are taken before the others (owned-object events,
  resyncs), so a burst of new models gets its Deployments first and readiness follows.

The queue is thread safe (the event loop adds, worker threads take); the clock is injectable for tests.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
logger = logging.getLogger("recserve.workqueue")


class WorkQueue(Generic[K]):
    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, base_delay: float = 0.5, max_delay: float = 60.0
    ) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._urgent: deque[K] = deque()
        self._dirty: set[K] = set()  # queued, or to be queued again once its reconcile is done
        self._processing: set[K] = set()
        self._urgent_later: set[K] = set()  # added urgently while processing
        self._added_at: dict[K, float] = {}  # when a waiting key was first queued (queue latency)
        self._delayed: list[tuple[float, int, K]] = []  # heap of (due, sequence, key)
        self._due: dict[K, float] = {}  # the live schedule of each delayed key (heap entries may be stale)
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._base_delay, self._max_delay = base_delay, max_delay
        self._shutdown = False

    # -- adding -------------------------------------------------------------------------------------------------

    def add(self, key: K, *, urgent: bool = False) -> bool:
        """Queue a key now; False when it was already waiting (deduplicated) or the queue is shut down."""
        with self._cond:
            return self._add(key, urgent=urgent)

    def _add(self, key: K, *, urgent: bool = False) -> bool:
        if self._shutdown:
            return False
        if key in self._dirty:
            if urgent and key not in self._urgent:
                with contextlib.suppress(ValueError):
                    self._queue.remove(key)  # waiting as ordinary work: move it ahead
                    self._urgent.append(key)
                if key in self._processing:
                    self._urgent_later.add(key)
            return False
        self._dirty.add(key)
        self._added_at.setdefault(key, self._clock())
        if key in self._processing:
            if urgent:
                self._urgent_later.add(key)
        else:
            (self._urgent if urgent else self._queue).append(key)
            self._cond.notify()
        return True

    def add_after(self, key: K, delay: float) -> None:
        """Queue a key after `delay` seconds, unless it is already scheduled sooner."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutdown:
                return
            due = self._clock() + delay
            if key in self._due and self._due[key] <= due:
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._seq), key))
            self._cond.notify()

    def add_rate_limited(self, key: K) -> float:
        """Retry a failed key after its backoff (base, 2 base, 4 base ... up to max); returns the delay chosen."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(self._max_delay, self._base_delay * 2.0**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts the backoff from the beginning."""
        with self._cond:
            self._failures.pop(key, None)

    def discard(self, key: K) -> None:
        """Drop every trace of a key (its model was deleted): waiting, scheduled, backoff."""
        with self._cond:
            self._dirty.discard(key)
            self._due.pop(key, None)
            self._failures.pop(key, None)
            self._added_at.pop(key, None)
            self._urgent_later.discard(key)
            for queue in (self._queue, self._urgent):
                with contextlib.suppress(ValueError):
                    queue.remove(key)

    # -- taking -------------------------------------------------------------------------------------------------

    def _promote(self) -> float | None:
        """Move due scheduled keys into the queue; seconds until the next one is due (None: nothing scheduled)."""
        now = self._clock()
        while self._delayed:
            due, _, key = self._delayed[0]
            if self._due.get(key) != due:
                heapq.heappop(self._delayed)  # superseded by an earlier schedule, or discarded
                continue
            if due > now:
                return due - now
            heapq.heappop(self._delayed)
            del self._due[key]
            self._add(key)
        return None

    def get(self, timeout: float | None = None) -> tuple[K, float] | None:
        """The next key and how long it waited (seconds), marked as processing; None at shutdown or timeout."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                wake = self._promote()
                if self._urgent or self._queue:
                    key = (self._urgent or self._queue).popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    waited = self._clock() - self._added_at.pop(key, self._clock())
                    return key, waited
                if self._shutdown:
                    return None
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return None
                    wake = left if wake is None else min(wake, left)
                self._cond.wait(wake)

    def done(self, key: K) -> None:
        """The key's reconcile finished: queue it again if it was added while it ran."""
        with self._cond:
            self._processing.discard(key)
            urgent = key in self._urgent_later
            self._urgent_later.discard(key)
            if key in self._dirty and not self._shutdown:
                (self._urgent if urgent else self._queue).append(key)
                self._cond.notify()

    # -- state --------------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    @property
    def is_shutdown(self) -> bool:
        return self._shutdown

    def __len__(self) -> int:
        """Keys waiting to be taken now (not the scheduled ones, nor those being processed)."""
        with self._cond:
            return len(self._queue) + len(self._urgent)

    def scheduled(self) -> int:
        with self._cond:
            return len(self._due)

    def processing(self) -> int:
        with self._cond:
            return len(self._processing)


class Workers(Generic[K]):
    """A fixed pool of threads draining a WorkQueue through `handle(key)`; `gate` holds them while it is clear
    (a standby replica keeps its caches warm but reconciles nothing)."""

    def __init__(
        self, queue: WorkQueue[K], handle: Callable[[K, float], None], count: int, *,
        gate: threading.Event | None = None,
    ) -> None:  # fmt: skip
        self.queue, self.handle, self.count = queue, handle, count
        self.gate = gate if gate is not None else threading.Event()
        if gate is None:
            self.gate.set()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._idle = threading.Condition()

    def start(self) -> None:
        for i in range(self.count):
            thread = threading.Thread(target=self._run, name=f"recserve-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        while not self.queue.is_shutdown:
            if not self.gate.wait(timeout=1.0):
                continue
            item = self.queue.get(timeout=1.0)
            if item is None:
                continue
            key, waited = item
            with self._idle:
                self._busy += 1
            try:
                if self.gate.is_set():
                    self.handle(key, waited)
                else:
                    self.queue.add(key)  # lost the gate between taking and handling: the next leader's work
            except Exception:  # handle() reports its own failures; a bug must not kill the worker
                logger.exception("Worker failed on key=%s", key)
            finally:
                self.queue.done(key)
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no worker is inside handle() (in-flight reconciles finished); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.shutdown()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
