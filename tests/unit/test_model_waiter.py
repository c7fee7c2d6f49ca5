"""decoder.serving.waiter.ModelWaiter (the logic behind `moe-decoder serve --wait-for-model`) over a
real store directory read in-process: capped backoff, one log line per reason to wait, the
timeout, cancellation from another thread, and a model packed while it waits.

No assertion rests on how fast the machine is: the backoff is read from the sleeps the waiter
asks for (its stop event records them), threads are awaited by state, not by sleeping."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from decoder.serving.waiter import ModelWaiter, ModelWaitTimeout, WaitCancelled
from expert_store.client import StoreClient
from expert_store.errors import DataLoss
from service_procs import pack_tiny_model

pytestmark = pytest.mark.timeout(120)


def waiter(store_dir, **kw) -> ModelWaiter:
    kw.setdefault("first_delay_s", 0.02)
    kw.setdefault("max_delay_s", 0.1)
    return ModelWaiter("tiny", str(store_dir), lambda: StoreClient.open(store_dir), **kw)


class RecordingStop(threading.Event):
    """A waiter's stop event that records every backoff sleep asked of it, and is set (a
    cancel from inside the wait) once `stop_after` sleeps were asked."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.sleeps: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout=None):
        if timeout is not None:
            self.sleeps.append(timeout)
            if self.stop_after is not None and len(self.sleeps) >= self.stop_after:
                self.set()
        return super().wait(timeout)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Until condition() holds (the bound only keeps a broken waiter from hanging the test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_backoff_doubles_up_to_its_cap_with_jitter(tmp_path):
    (tmp_path / "store").mkdir()
    w = waiter(tmp_path / "store")
    w._stop = RecordingStop(stop_after=7)
    with pytest.raises(WaitCancelled):
        w.run(lambda c: None)
    # 0.02, 0.04, 0.08, then 0.1 (not 0.16, 0.32, ...), each shortened by up to 20% of jitter
    want = [0.02, 0.04, 0.08, 0.1, 0.1, 0.1, 0.1]
    assert len(w._stop.sleeps) == len(want) and w.attempts == len(want)
    for got, nominal in zip(w._stop.sleeps, want):
        assert 0.8 * nominal <= got <= nominal, (w._stop.sleeps, want)
    w.close()


def test_timeout_with_one_log_line(tmp_path, caplog):
    (tmp_path / "store").mkdir()
    w = waiter(tmp_path / "store", timeout_s=1.0)
    w._stop = RecordingStop()
    loads = []
    caplog.set_level(logging.INFO, logger="decoder.waiter")
    t0 = time.monotonic()
    with pytest.raises(ModelWaitTimeout) as e:
        w.run(loads.append)
    assert time.monotonic() - t0 >= 1.0 and not loads
    # no sleep reaches past the deadline: each is cut to the time left
    assert sum(w._stop.sleeps) <= 1.0 + 1e-3 and all(x <= 0.1 for x in w._stop.sleeps), w._stop.sleeps
    assert "did not appear in store" in str(e.value) and "within 1s" in str(e.value)
    lines = [r.getMessage() for r in caplog.records if r.name == "decoder.waiter"]
    assert len(lines) == 1 and "is not in the store yet" in lines[0], lines
    assert w.state == "no-model" and "not in the store yet" in w.message()
    w.close()


def test_missing_store_directory_then_model_packed_while_waiting(tmp_path):
    store_dir = tmp_path / "m" / "store"  # does not exist yet: waited for like an empty store
    w = waiter(store_dir)
    got: list = []
    t = threading.Thread(target=lambda: got.append(w.run(lambda client: client.manifest("tiny"))))
    t.start()
    wait_for(lambda: w.attempts >= 2 and w.state == "no-model", f"still {w.state}, {w.attempts} attempts")
    assert t.is_alive() and not got
    assert pack_tiny_model(tmp_path / "m", "tiny") == store_dir
    t.join(10)
    assert not t.is_alive() and got and got[0].model == "tiny" and w.state == "loaded"
    w.close()


def test_cancel_ends_the_wait_at_once(tmp_path):
    (tmp_path / "store").mkdir()
    w = waiter(tmp_path / "store", max_delay_s=30.0, first_delay_s=30.0)
    errors: list = []

    def run() -> None:
        try:
            w.run(lambda c: None)
        except BaseException as e:
            errors.append(e)

    w._stop = RecordingStop()
    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: w._stop.sleeps, "the waiter never went to sleep")  # in its first 30 s sleep
    w.cancel()
    t.join(20)  # well inside the 30 s it would sleep otherwise
    assert not t.is_alive() and w._stop.sleeps == [pytest.approx(w._stop.sleeps[0])] and w.attempts == 1
    assert len(errors) == 1 and isinstance(errors[0], WaitCancelled)
    w.close()


def test_other_store_errors_are_not_waited_for(tmp_path):
    store_dir = pack_tiny_model(tmp_path / "m", "tiny")
    (store_dir / "models" / "tiny" / "manifest.json").write_text("[not a manifest")
    w = waiter(store_dir, timeout_s=30.0)
    w._stop = RecordingStop()
    with pytest.raises(DataLoss):
        w.run(lambda c: None)
    assert w.attempts == 1 and not w._stop.sleeps  # raised at once: no backoff sleep
    w.close()


def test_needs_profile_waits_for_the_calibration_profile(tmp_path, caplog):
    """Adaptive gating reads its sensitivities and budget from the profile: with needs_profile
    the waiter treats a model without one as not there yet (one log line, its own message),
    and loads once `moe-decoder calibrate --upload` has stored it."""
    from decoder.calibrate import upload_profile

    store_dir = pack_tiny_model(tmp_path / "m", "tiny")
    w = waiter(store_dir, needs_profile=True)
    caplog.set_level(logging.INFO, logger="decoder.waiter")
    got: list = []
    t = threading.Thread(target=lambda: got.append(w.run(lambda client: client.manifest("tiny"))))
    t.start()
    wait_for(lambda: w.state == "no-profile" and w.attempts >= 2, f"still {w.state}")  # asked twice, waiting
    assert t.is_alive() and not got and "not calibrated yet" in w.message() and "calibrate --upload" in w.message()
    upload_profile(str(store_dir), None, "tiny", b'{"schema": "adapmoe.profile", "sensitivity": [1.0]}\n')
    t.join(10)
    assert not t.is_alive() and got and got[0].profile["sensitivity"] == [1.0] and w.state == "loaded"
    lines = [r.getMessage() for r in caplog.records if r.name == "decoder.waiter"]
    assert sum("not calibrated yet" in line for line in lines) == 1, lines
    w.close()
    # without needs_profile the same model (before calibration) loads at once
    bare = pack_tiny_model(tmp_path / "n", "tiny")
    w = waiter(bare)
    assert w.run(lambda client: client.manifest("tiny")).profile is None and w.attempts == 1
    w.close()
