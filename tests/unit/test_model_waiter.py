"""decoder.serving.waiter.ModelWaiter (the logic behind `moe-decoder serve --wait-for-model`) over a
real store directory read in-process: capped backoff, one log line per reason to wait, the
timeout, cancellation from another thread, and a model packed while it waits."""

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


def test_timeout_after_capped_backoff_with_one_log_line(tmp_path, caplog):
    (tmp_path / "store").mkdir()
    w = waiter(tmp_path / "store", timeout_s=1.0)
    loads = []
    caplog.set_level(logging.INFO, logger="decoder.waiter")
    t0 = time.monotonic()
    with pytest.raises(ModelWaitTimeout) as e:
        w.run(loads.append)
    took = time.monotonic() - t0
    assert 1.0 <= took < 1.5 and not loads
    # 0.02, 0.04, 0.08, then every <= 0.1 s: the cap holds (no doubling past it)
    assert w.attempts >= 9, w.attempts
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
    time.sleep(0.3)
    assert t.is_alive() and w.attempts >= 2
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

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    w.cancel()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0
    assert len(errors) == 1 and isinstance(errors[0], WaitCancelled)
    w.close()


def test_other_store_errors_are_not_waited_for(tmp_path):
    store_dir = pack_tiny_model(tmp_path / "m", "tiny")
    (store_dir / "models" / "tiny" / "manifest.json").write_text("[not a manifest")
    w = waiter(store_dir, timeout_s=30.0)
    t0 = time.monotonic()
    with pytest.raises(DataLoss):
        w.run(lambda c: None)
    assert time.monotonic() - t0 < 1.0 and w.attempts == 1
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
    deadline = time.monotonic() + 30
    while w.state != "no-profile" or w.attempts < 2:  # asked at least twice, still waiting
        assert t.is_alive() and time.monotonic() < deadline, (w.state, w.attempts)
        time.sleep(0.01)
    assert not got and "not calibrated yet" in w.message() and "calibrate --upload" in w.message()
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
