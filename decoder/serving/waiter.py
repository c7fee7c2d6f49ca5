"""`moe-decoder serve --wait-for-model`: wait until the model is in the store, then load it
(`ModelWaiter`, plain logic with no server), on a daemon thread whose result the service
picks up when it is there (`BackgroundLoad`)."""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

log = logging.getLogger("decoder.waiter")


class ModelWaitTimeout(TimeoutError):
    """--wait-timeout passed before the model could be loaded."""


class WaitCancelled(Exception):
    """The wait was cancelled (SIGTERM)."""


class _NotCalibrated(Exception):
    """The model is in the store, without the calibration profile the load needs."""


# store errors that mean "not yet": the model is not packed, the store is not up (or busy)
_WAITABLE = {"NOT_FOUND": "no-model", "UNAVAILABLE": "no-store", "RESOURCE_EXHAUSTED": "no-store",
             "DEADLINE_EXCEEDED": "no-store"}
NO_PROFILE = "no calibration profile, profile.json"


class ModelWaiter:
    """Waits until `model` is in the store, then loads it (plain logic, no server).

    `run(load)` opens a client with `open_client()` (again and again while that fails: a store
    directory that does not exist yet, no ready endpoint behind a k8s:// target), asks for the
    model's manifest until the store answers with it, then returns `load(client)`. NOT_FOUND
    ("not in the store yet") and UNAVAILABLE ("store unreachable") are retried after a capped
    exponential backoff (first_delay_s, doubling up to max_delay_s, with jitter), also when
    `load` raises them; any other error is raised at once. One log line each time the reason
    for waiting changes (and a reminder every reminder_s), not one per attempt: the store
    client's own per-attempt warnings are muted while waiting. `cancel()` (any thread) ends
    the wait with WaitCancelled; timeout_s with ModelWaitTimeout."""

    QUIET_LOGGERS = ("expert_store.client", "expert_store.discovery")

    def __init__(self, model: str, store: str, open_client: Callable[[], Any], *, timeout_s: float | None = None,
                 needs_profile: bool = False, first_delay_s: float = 0.5, max_delay_s: float = 5.0,
                 reminder_s: float = 60.0,
                 logger: logging.Logger | None = None) -> None:
        self.model, self.store = model, store
        self.open_client = open_client
        self.timeout_s = timeout_s
        self.needs_profile = needs_profile
        self.first_delay_s, self.max_delay_s, self.reminder_s = first_delay_s, max_delay_s, reminder_s
        self.log = logger or log
        self.client: Any = None
        self.state = "waiting"      # waiting | no-store | no-model | no-profile | loading | loaded
        self.last_error = ""
        self.attempts = 0
        self._stop = threading.Event()

    def cancel(self) -> None:
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def message(self) -> str:
        """Why the model is not served yet (Generate's UNAVAILABLE details)."""
        if self.state == "no-store":
            return (f"model {self.model!r} not in the store yet: store {self.store} is unreachable "
                    f"({self.last_error}); waiting for it")
        if self.state == "no-profile":
            return (f"model {self.model!r} is in the store but not calibrated yet ({NO_PROFILE}, which "
                    f"`moe-decoder calibrate --upload` stores); waiting for it")
        if self.state == "loading":
            return f"model {self.model!r} is loading from store {self.store}"
        if self.state == "loaded":
            return f"model {self.model!r} is loaded"
        return f"model {self.model!r} not in the store yet (store {self.store}); waiting for it"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self, load: Callable[[Any], Any]) -> Any:
        from expert_store.errors import StoreError

        t0 = time.monotonic()
        deadline = None if self.timeout_s is None else t0 + self.timeout_s
        quiet = {name: logging.getLogger(name).level for name in self.QUIET_LOGGERS}
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        delay, logged_state, next_reminder = self.first_delay_s, None, t0 + self.reminder_s
        try:
            while True:
                if self._stop.is_set():
                    raise WaitCancelled(f"stopped while waiting for model {self.model!r}")
                self.attempts += 1
                try:
                    if self.client is None:
                        self.client = self.open_client()
                    manifest = self.client.manifest(self.model)
                    if self.needs_profile and not manifest.profile:
                        raise _NotCalibrated(NO_PROFILE)
                    self.state = "loading"
                    for name, level in quiet.items():  # from here on, store trouble is news
                        logging.getLogger(name).setLevel(level)
                    quiet = {}
                    if logged_state is not None:
                        self.log.info("model %s is in store %s after %.1fs (%d attempts): loading it", self.model,
                                      self.store, time.monotonic() - t0, self.attempts)
                    result = load(self.client)
                    self.state = "loaded"
                    return result
                except _NotCalibrated as e:
                    self.state, self.last_error = "no-profile", str(e)
                except StoreError as e:
                    state = _WAITABLE.get(e.code)
                    if state is None:
                        raise
                    self.state = state
                    self.last_error = (str(e).strip().splitlines() or [e.code])[0]
                now = time.monotonic()
                if self.state != logged_state:
                    retry = (f"retrying in {delay:.1f}s, backing off to every {self.max_delay_s:g}s"
                             + ("" if deadline is None else f", for at most {self.timeout_s:g}s in all"))
                    if self.state == "no-model":
                        self.log.info("model %s is not in the store yet; waiting for it (store %s, %s)",
                                      self.model, self.store, retry)
                    elif self.state == "no-profile":
                        self.log.info("model %s is in store %s but not calibrated yet (%s: its gating needs "
                                      "one); waiting for `moe-decoder calibrate --upload` (%s)", self.model,
                                      self.store, NO_PROFILE, retry)
                    else:
                        self.log.warning("store %s is unreachable (%s); waiting for it (model %s, %s)",
                                         self.store, self.last_error, self.model, retry)
                    logged_state, next_reminder = self.state, now + self.reminder_s
                elif now >= next_reminder:
                    self.log.info("still waiting for model %s: %.0fs, %d attempts (last: %s)", self.model,
                                  now - t0, self.attempts, self.last_error)
                    next_reminder = now + self.reminder_s
                if deadline is not None and now >= deadline:
                    raise ModelWaitTimeout(
                        f"model {self.model!r} did not appear in store {self.store} within {self.timeout_s:g}s "
                        f"({self.attempts} attempts; last: {self.last_error})")
                sleep = delay * random.uniform(0.8, 1.0)
                if deadline is not None:
                    sleep = min(sleep, max(0.0, deadline - now))
                if self._stop.wait(sleep):
                    raise WaitCancelled(f"stopped while waiting for model {self.model!r}")
                delay = min(self.max_delay_s, delay * 2)
        finally:
            for name, level in quiet.items():
                logging.getLogger(name).setLevel(level)


class BackgroundLoad:
    """fn() on a daemon thread (a wait that SIGTERM cuts short must not hold up the exit); its
    result or error lands in `.future`. `abandon()` hands back a result that is already there
    (the caller cleans it up); a result that arrives later goes to cleanup(result) instead."""

    def __init__(self, fn: Callable[[], Any], cleanup: Callable[[Any], None]) -> None:
        self.future: Future[Any] = Future()
        self._cleanup = cleanup
        self._lock = threading.Lock()
        self._abandoned = False
        self.thread = threading.Thread(target=self._run, args=(fn,), name="load-model", daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except BaseException as e:  # handed to the event loop
            with self._lock:
                if not self._abandoned and not self.future.cancelled():
                    try:
                        self.future.set_exception(e)
                    except Exception:  # cancelled meanwhile
                        pass
            return
        with self._lock:
            if not self._abandoned and not self.future.cancelled():
                try:
                    self.future.set_result(result)
                    return
                except Exception:  # cancelled meanwhile
                    pass
        self._cleanup(result)

    def abandon(self) -> Any:
        with self._lock:
            self._abandoned = True
            f = self.future
            if f.done() and not f.cancelled() and f.exception() is None:
                return f.result()
        return None

