"""One worker thread runs the model; requests queue for it. Rows of concurrent requests are
merged into one forward up to a token budget (rows x the longest row, i.e. counting the
padding), first come first served; generation runs as tasks of one step each, re-queued
after every step, so that scoring requests are not held up by a long generation."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Task(Protocol):
    def step(self) -> bool:
        """Run one step on the worker thread; True when finished (then ``result`` is set)."""

    result: Any


@dataclass
class _Row:
    ids: list[int]
    future: Future


@dataclass
class _TaskItem:
    task: Task
    future: Future
    started: bool = False


@dataclass
class BatchStats:
    forwards: int = 0  # batched forwards run
    rows: int = 0  # rows they held
    tokens: int = 0  # real (unpadded) tokens they held
    max_rows: int = 0  # the most rows one forward held
    task_steps: int = 0  # generation steps run

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Batcher:
    forward: Callable[[list[list[int]]], list[torch.Tensor]]  # rows -> hidden [L_i, D] each
    max_batch_tokens: int
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self._queue: deque[_Row | _TaskItem] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="kdk-serve-model", daemon=True)
        self._thread.start()

    # -- the asyncio side ---------------------------------------------------------------------
    async def hidden(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """Each row's hidden states, however the worker batches them."""
        futures = self.submit_rows(rows)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    async def run(self, task: Task) -> Any:
        return await asyncio.wrap_future(self.submit_task(task))

    def submit_rows(self, rows: list[list[int]]) -> list[Future]:
        items = [_Row(list(r), Future()) for r in rows]
        self._put(items)
        return [i.future for i in items]

    def submit_task(self, task: Task) -> Future:
        item = _TaskItem(task, Future())
        self._put([item])
        return item.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _put(self, items: list) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.extend(items)
            self._cond.notify()

    # -- the worker thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for item in self._queue:  # a started generation cannot be cancelled
                        if not item.future.cancel():
                            item.future.set_exception(RuntimeError("the server is shutting "
                                                                   "down"))
                    return
                work = self._take()
            if isinstance(work, _TaskItem):
                self._step(work)
            elif work:
                self._forward(work)

    def _take(self) -> list[_Row] | _TaskItem:
        """Under the lock: the next task, or the rows of the next forward (first the oldest
        row, then later rows in order while rows x longest stays within the budget)."""
        first = self._queue.popleft()
        if isinstance(first, _TaskItem):
            return first
        batch, width = [first], len(first.ids)
        kept: deque[_Row | _TaskItem] = deque()
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Row):
                w = max(width, len(item.ids))
                if (len(batch) + 1) * w > self.max_batch_tokens:
                    self._queue.appendleft(item)
                    break
                batch.append(item)
                width = w
            else:
                kept.append(item)
        self._queue.extendleft(reversed(kept))
        # a row whose request went away (client disconnected) is not run
        return [r for r in batch if r.future.set_running_or_notify_cancel()]

    def _forward(self, rows: list[_Row]) -> None:
        try:
            hidden = self.forward([r.ids for r in rows])
        except BaseException as err:  # the requests get the error; the worker lives on
            for r in rows:
                r.future.set_exception(err)
            return
        s = self.stats
        s.forwards += 1
        s.rows += len(rows)
        s.tokens += sum(len(r.ids) for r in rows)
        s.max_rows = max(s.max_rows, len(rows))
        for r, h in zip(rows, hidden, strict=True):
            r.future.set_result(h)

    def _step(self, item: _TaskItem) -> None:
        if not item.started:
            if not item.future.set_running_or_notify_cancel():
                return
            item.started = True
        try:
            done = item.task.step()
        except BaseException as err:
            item.future.set_exception(err)
            return
        self.stats.task_steps += 1
        if done:
            item.future.set_result(item.task.result)
            return
        with self._cond:  # back of the queue: waiting rows and tasks go first
            if self._closed:
                item.future.set_exception(RuntimeError("the server is shutting down"))
            else:
                self._queue.append(item)
