"""The dynamic batcher: single requests grouped into batches under a queue-delay budget, run on
one of `instance_count` model instances, each request answered with its own rows.

Triton's rules: a batch goes as soon as the waiting items fill `max_batch_size` or one of the
`preferred_batch_sizes` (the largest that fits); otherwise when the oldest waiting item has
waited `max_queue_delay_us`. Items go together only when their inputs agree in every dimension
but the batch one, except an input with a pad value, whose variable dimensions are padded to
the longest item (outputs that follow such a dimension are cut back to each item's length). An
item still queued past its timeout fails; a full queue refuses new items. A batch that fails
is run again item by item, so the one bad request fails alone.

Pure Python and numpy: the model is a function `run(instance, inputs) -> outputs`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("surge.tensor")

Arrays = dict[str, np.ndarray]
Runner = Callable[[int, Arrays], Arrays]  # (instance index, inputs) -> outputs


class QueueFullError(RuntimeError):
    """The model's queue holds max_queue_size items already."""


class QueueTimeoutError(RuntimeError):
    """The item waited in the queue past its timeout."""


class BatcherClosedError(RuntimeError):
    """The model was unloaded before the item ran."""


@dataclass(eq=False)
class Item:
    inputs: Arrays
    rows: int  # the item's size along the batch dimension (1 when the model does not batch)
    key: tuple  # items with equal keys can share a batch
    enqueued: float
    deadline: float | None
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """What the batcher has done, for inspection (the server's metrics and dashboard get each
    batch through `observe`)."""

    batches: int = 0
    items: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # rows per batch -> how many batches


class DynamicBatcher:
    def __init__(self, run: Runner, instances: int, max_batch_size: int, preferred: tuple[int, ...] = (),
                 max_queue_delay_us: int = 0, max_queue_size: int = 0, default_timeout_us: int = 0,
                 pad_values: Mapping[str, float | int] | None = None,
                 observe: Callable[[int, list[float], float], None] | None = None, name: str = "model"):
        self.run = run
        self.batching = max_batch_size > 0
        self.max_rows = max(max_batch_size, 1)
        self.preferred = tuple(p for p in sorted(preferred) if p <= self.max_rows)
        self.delay = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self.default_timeout = default_timeout_us / 1e6
        self.pad_values = dict(pad_values or {})
        self.observe = observe
        self.stats = BatchStats()
        self._queue: list[Item] = []
        self._cond = threading.Condition()
        self._closed = False
        self._queued_rows = 0
        self._go_rows = min(self.preferred or (self.max_rows,)) if self.batching else 1  # rows that make a batch
        self._reaper: threading.Thread | None = None  # fails timed-out items while every instance is busy
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"surge-batcher-{name}-{i}",
                                          daemon=True) for i in range(instances)]
        for t in self._threads:
            t.start()

    # ---- the caller's side ---------------------------------------------------------------

    def submit(self, inputs: Arrays, timeout_us: int | None = None) -> Future:
        """Queue one request's inputs (with their batch dimension when the model batches); its
        future gets the outputs. QueueFullError when the queue is full."""
        rows = next(iter(inputs.values())).shape[0] if self.batching and inputs else 1
        key = tuple(sorted((name, a.ndim if name in self.pad_values else a.shape[1:], a.dtype.str)
                           for name, a in inputs.items())) if self.batching else ()
        now = time.monotonic()
        timeout = timeout_us / 1e6 if timeout_us else self.default_timeout
        item = Item(inputs, rows, key, now, now + timeout if timeout else None)
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the model is being unloaded")
            if self.max_queue_size and len(self._queue) >= self.max_queue_size:
                raise QueueFullError(f"the queue holds {len(self._queue)} requests (max_queue_size "
                                     f"{self.max_queue_size})")
            self._queue.append(item)
            self._queued_rows += item.rows
            if item.deadline is not None and self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="surge-batcher-timeouts", daemon=True)
                self._reaper.start()
            # wake the instances only when there is something new for them to decide: a first
            # item, enough rows for a batch, a deadline to watch. Each wake costs the woken
            # thread a turn at the GIL, which a busy event loop hands over only every few ms.
            if len(self._queue) == 1 or self._queued_rows >= self._go_rows or item.deadline is not None:
                self._cond.notify_all()
        return item.future

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Stop the instances once their running batch is done; queued items fail."""
        with self._cond:
            self._closed = True
            left, self._queue = self._queue, []
            self._queued_rows = 0
            self._cond.notify_all()
        for item in left:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosedError("the model was unloaded before the request ran"))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=60)

    # ---- the instances' side -------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """Fail the queued items past their deadline, drop the cancelled ones (under the lock)."""
        keep = []
        for item in self._queue:
            if item.future.cancelled():
                continue
            if item.deadline is not None and now >= item.deadline:
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(QueueTimeoutError(
                        f"the request waited {now - item.enqueued:.3f}s in the queue, past its timeout"))
                continue
            keep.append(item)
        self._queue = keep
        self._queued_rows = sum(i.rows for i in keep)

    def _reap(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                self._expire(now)
                deadlines = [i.deadline for i in self._queue if i.deadline is not None]
                self._cond.wait(timeout=max(min(deadlines) - now, 0.0) + 0.001 if deadlines else None)

    def _candidates(self) -> list[Item]:
        """The oldest item and those queued after it that may join its batch, up to max rows."""
        first = self._queue[0]
        group, rows = [first], first.rows
        for item in self._queue[1:]:
            if item.key == first.key and rows + item.rows <= self.max_rows:
                group.append(item)
                rows += item.rows
        return group

    def _take(self, now: float) -> tuple[list[Item], float | None]:
        """(the batch to run now, or [] and when to look again) (under the lock)."""
        group = self._candidates()
        rows = sum(i.rows for i in group)
        target = None
        if rows >= self.max_rows or not self.batching:
            target = self.max_rows
        else:
            fitting = [p for p in self.preferred if p <= rows]
            if fitting:
                target = fitting[-1]
            elif now >= group[0].enqueued + self.delay:
                target = self.max_rows
        if target is None:
            wake = group[0].enqueued + self.delay
            deadlines = [i.deadline for i in self._queue if i.deadline is not None]
            return [], min([wake, *deadlines])
        batch, total = [], 0
        for item in group:
            if total + item.rows > target:
                break
            batch.append(item)
            total += item.rows
        taken = set(map(id, batch))
        self._queue = [i for i in self._queue if id(i) not in taken]
        self._queued_rows -= total
        return batch, None

    def _work(self, instance: int) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = time.monotonic()
                    self._expire(now)
                    if not self._queue:
                        self._cond.wait()
                        continue
                    batch, wake = self._take(now)
                    if batch:
                        break
                    self._cond.wait(timeout=max(wake - now, 0.0) if wake is not None else None)
            batch = [i for i in batch if i.future.set_running_or_notify_cancel()]
            if batch:
                self._run(instance, batch)

    def _run(self, instance: int, batch: list[Item]) -> None:
        start = time.monotonic()
        waits = [start - i.enqueued for i in batch]
        try:
            results = self._compute(instance, batch)
        except Exception as exc:  # noqa: BLE001 - the batch's requests get the error, the instance goes on
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
            else:  # find the one that fails: each item alone
                logger.info("a batch of %d requests failed (%s); running them one by one", len(batch), exc)
                for item in batch:
                    try:
                        (out,) = self._compute(instance, [item])
                    except Exception as alone:  # noqa: BLE001
                        item.future.set_exception(alone)
                    else:
                        item.future.set_result(out)
        else:
            for item, out in zip(batch, results):
                item.future.set_result(out)
        self._record(waits, sum(i.rows for i in batch), time.monotonic() - start)

    def _compute(self, instance: int, batch: list[Item]) -> list[Arrays]:
        """Each item's outputs of one run of the model on the items together."""
        if not self.batching:
            return [self.run(instance, batch[0].inputs)]
        inputs, lengths = self._stack(batch)
        return self._split(self.run(instance, inputs), batch, lengths)

    def _record(self, waits: list[float], rows: int, seconds: float) -> None:
        with self._cond:
            self.stats.batches += 1
            self.stats.sizes[rows] = self.stats.sizes.get(rows, 0) + 1
            self.stats.items += len(waits)
        if self.observe is not None:
            self.observe(rows, waits, seconds)

    def _stack(self, batch: list[Item]) -> tuple[Arrays, list[dict[int, tuple[int, int]]]]:
        """The items' inputs concatenated along the batch dimension, padded inputs padded to the
        longest; and for each item, every padded axis as (its own length, the padded one)."""
        lengths: list[dict[int, tuple[int, int]]] = [{} for _ in batch]
        stacked: Arrays = {}
        for name in batch[0].inputs:
            arrays = [item.inputs[name] for item in batch]
            if name in self.pad_values:
                ndim = arrays[0].ndim
                longest = [max(a.shape[d] for a in arrays) for d in range(ndim)]
                padded = []
                for k, a in enumerate(arrays):
                    widths = [(0, 0)] + [(0, longest[d] - a.shape[d]) for d in range(1, ndim)]
                    for d in range(1, ndim):
                        if a.shape[d] != longest[d]:
                            own = min(lengths[k].get(d, (a.shape[d], 0))[0], a.shape[d])
                            lengths[k][d] = (own, longest[d])
                    padded.append(np.pad(a, widths, constant_values=self.pad_values[name])
                                  if any(w for _, w in widths) else a)
                arrays = padded
            stacked[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        return stacked, lengths

    @staticmethod
    def _split(outputs: Arrays, batch: list[Item], lengths: list[dict[int, tuple[int, int]]]) -> list[Arrays]:
        """Each item's rows of every output, cut back to its own length on padded axes."""
        rows = sum(i.rows for i in batch)
        for name, out in outputs.items():
            if out.ndim == 0 or out.shape[0] != rows:
                raise RuntimeError(f"output '{name}' has {out.shape[0] if out.ndim else 0} rows for a batch of {rows}")
        results, at = [], 0
        for item, own in zip(batch, lengths):
            mine: Arrays = {}
            for name, out in outputs.items():
                part = out[at:at + item.rows]
                cut = tuple(slice(0, own[d][0]) if d in own and part.shape[d] == own[d][1] else slice(None)
                            for d in range(part.ndim))
                mine[name] = np.ascontiguousarray(part[cut]) if own else part
            results.append(mine)
            at += item.rows
        return results
