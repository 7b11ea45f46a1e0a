"""The dynamic batcher on a fake model: batches formed by size, preferred size and queue delay;
each request gets its own rows back (cut back after padding); a full queue, a timeout, a
failing request, a cancelled one and an unload each affect only the requests they concern."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from surge.tensor.batcher import BatcherClosedError, DynamicBatcher, QueueFullError, QueueTimeoutError


class Model:
    """Doubles `x` and returns its row sums; records each batch's rows; can be held at the door."""

    def __init__(self, hold: bool = False):
        self.batches: list[int] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.entered = threading.Event()

    def __call__(self, instance: int, inputs: dict) -> dict:
        self.entered.set()
        assert self.gate.wait(10)
        x = inputs["x"]
        if (x < 0).any():
            raise ValueError("negative input")
        self.batches.append(x.shape[0])
        return {"double": x * 2, "total": x.reshape(x.shape[0], -1).sum(axis=1)}


def item(value: float, length: int = 3, rows: int = 1) -> dict:
    return {"x": np.full((rows, length), value, dtype=np.float32)}


def test_full_batches_go_at_once_and_each_request_gets_its_rows():
    model = Model()
    b = DynamicBatcher(model, 1, max_batch_size=4, max_queue_delay_us=10_000_000)
    try:
        model.gate.clear()
        futures = [b.submit(item(i)) for i in range(8)]
        model.gate.set()
        results = [f.result(timeout=10) for f in futures]
        for i, r in enumerate(results):
            np.testing.assert_array_equal(r["double"], np.full((1, 3), 2 * i, dtype=np.float32))
            assert r["total"].tolist() == [3 * i]
        assert model.batches == [4, 4]  # full batches never waited for the 10 s delay
        assert b.stats.sizes == {4: 2} and b.stats.items == 8
    finally:
        b.close()


def test_a_partial_batch_waits_for_the_queue_delay_then_goes():
    model = Model()
    b = DynamicBatcher(model, 1, max_batch_size=8, max_queue_delay_us=200_000)
    try:
        start = time.monotonic()
        futures = [b.submit(item(i)) for i in range(3)]
        for f in futures:
            f.result(timeout=10)
        assert time.monotonic() - start >= 0.19
        assert model.batches == [3]
    finally:
        b.close()


def test_preferred_batch_size_goes_before_the_delay():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=8, preferred=(2,), max_queue_delay_us=300_000)
    try:
        futures = [b.submit(item(i)) for i in range(3)]
        model.gate.set()
        futures[1].result(timeout=10)
        assert not futures[2].done()  # one left over: it waits out the delay
        futures[2].result(timeout=10)
        assert model.batches == [2, 1]
    finally:
        b.close()


def test_requests_with_several_rows_and_different_shapes():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=4, max_queue_delay_us=50_000)
    try:
        a = b.submit(item(1, rows=3))
        c = b.submit(item(2, length=5))  # another shape: not in a's batch
        d = b.submit(item(3, rows=2))  # would make 5 rows with a: waits for the next batch
        e = b.submit(item(4))
        model.gate.set()
        assert a.result(timeout=10)["double"].shape == (3, 3)
        assert c.result(timeout=10)["double"].shape == (1, 5)
        assert d.result(timeout=10)["total"].tolist() == [9, 9]
        assert e.result(timeout=10)["total"].tolist() == [12]
        assert sorted(model.batches) == [1, 3, 4] or sorted(model.batches) == [1, 2, 4]
    finally:
        b.close()


def test_padding_batches_lengths_together_and_cuts_outputs_back():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=4, max_queue_delay_us=50_000, pad_values={"x": 0})
    try:
        futures = [b.submit(item(i + 1, length=n)) for i, n in enumerate((2, 5, 3))]
        model.gate.set()
        for i, (f, n) in enumerate(zip(futures, (2, 5, 3))):
            r = f.result(timeout=10)
            np.testing.assert_array_equal(r["double"], np.full((1, n), 2 * (i + 1), dtype=np.float32))
            assert r["total"].tolist() == [(i + 1) * n]  # padding with 0 leaves the sum alone
        assert model.batches == [3]
    finally:
        b.close()


def test_full_queue_is_refused():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=1, max_queue_size=2)
    try:
        first = b.submit(item(0))
        assert model.entered.wait(5)  # running: no longer queued
        queued = [b.submit(item(1)), b.submit(item(2))]
        with pytest.raises(QueueFullError, match="max_queue_size 2"):
            b.submit(item(3))
        model.gate.set()
        for f in (first, *queued):
            f.result(timeout=10)
    finally:
        b.close()


def test_a_request_past_its_timeout_fails_and_the_rest_run():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=1)
    try:
        first = b.submit(item(0))
        assert model.entered.wait(5)
        late = b.submit(item(1), timeout_us=50_000)
        patient = b.submit(item(2))
        time.sleep(0.2)
        with pytest.raises(QueueTimeoutError):
            late.result(timeout=5)  # failed while the instance was still busy
        model.gate.set()
        assert first.result(timeout=10)["total"].tolist() == [0]
        assert patient.result(timeout=10)["total"].tolist() == [6]
    finally:
        b.close()


def test_a_failing_request_fails_alone():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=4, max_queue_delay_us=50_000)
    try:
        futures = [b.submit(item(v)) for v in (1, -1, 2)]
        model.gate.set()
        assert futures[0].result(timeout=10)["total"].tolist() == [3]
        with pytest.raises(ValueError, match="negative"):
            futures[1].result(timeout=10)
        assert futures[2].result(timeout=10)["total"].tolist() == [6]
        assert b.submit(item(5)).result(timeout=10)["total"].tolist() == [15]
    finally:
        b.close()


def test_cancelled_requests_do_not_run():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=1)
    try:
        first = b.submit(item(0))
        assert model.entered.wait(5)
        gone = b.submit(item(7))
        assert gone.cancel()
        model.gate.set()
        first.result(timeout=10)
        b.submit(item(1)).result(timeout=10)
        assert model.batches == [1, 1]
    finally:
        b.close()


def test_instances_run_batches_in_parallel():
    barrier = threading.Barrier(2, timeout=5)

    def run(instance: int, inputs: dict) -> dict:
        barrier.wait()  # both instances must be inside at once
        return {"y": inputs["x"] + instance * 0}

    b = DynamicBatcher(run, 2, max_batch_size=1)
    try:
        futures = [b.submit(item(i)) for i in range(2)]
        for f in futures:
            f.result(timeout=10)
    finally:
        b.close()


def test_close_fails_what_is_queued_and_refuses_more():
    model = Model(hold=True)
    b = DynamicBatcher(model, 1, max_batch_size=1)
    first = b.submit(item(0))
    assert model.entered.wait(5)
    queued = b.submit(item(1))
    closer = threading.Thread(target=b.close)
    closer.start()
    with pytest.raises(BatcherClosedError):
        queued.result(timeout=5)
    model.gate.set()
    closer.join(10)
    assert first.result(timeout=5)["total"].tolist() == [0]  # the running batch finished
    with pytest.raises(BatcherClosedError):
        b.submit(item(2))


def test_a_model_without_batching_runs_each_request_as_it_is():
    model = Model()
    b = DynamicBatcher(model, 1, max_batch_size=0, max_queue_delay_us=1_000_000)
    try:
        out = b.submit({"x": np.ones((2, 3), dtype=np.float32)}).result(timeout=10)
        assert out["total"].tolist() == [3, 3]
    finally:
        b.close()
