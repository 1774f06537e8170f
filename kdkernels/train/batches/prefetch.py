"""One request ahead: while the loop trains on micro-batch n, a single background thread
fetches micro-batch n + 1 (a served teacher's targets), so the step waits only for what the
server has not finished by then.

What is fetched is a pure function of its key, and the next key is a function of the current
one, so a batch is the same with or without prefetch and in any order of requests (a resume
starts anywhere: a request for a key other than the one in flight cancels it and fetches that
key). The time the loop spends blocked on a result is measured here: the teacher's cost that
the overlap did not hide.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any


class Prefetcher:
    """get(key) -> fetch(key), with fetch(following(key)) started before it returns.

    ``following(key)`` is the key the caller asks for next, or None after the last one (no
    request is wasted past the end). One daemon thread runs the fetches in order: a fetch
    still running when the process exits (a dead server being retried) does not hold it.
    """

    def __init__(self, fetch: Callable[[Any], Any],
                 following: Callable[[Any], Any | None]) -> None:
        self._fetch = fetch
        self._following = following
        self._pending: dict[Hashable, Future] = {}
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="kdk-prefetch", daemon=True)
        self._worker.start()
        self.wait_s = 0.0  # time get() spent blocked on a result
        self.fetch_s = 0.0  # time the fetches themselves took (in the background or not)
        self.fetches = 0
        self.prefetched = 0  # results that were already in flight when asked for

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            key, fut = job
            if not fut.set_running_or_notify_cancel():  # cancelled while queued
                continue
            t0 = time.perf_counter()
            try:
                result = self._fetch(key)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting get()
                fut.set_exception(err)
            else:
                fut.set_result(result)
            finally:
                self.fetch_s += time.perf_counter() - t0
                self.fetches += 1

    def _submit(self, key: Hashable) -> Future:
        fut: Future = Future()
        self._pending[key] = fut
        self._jobs.put((key, fut))
        return fut

    def get(self, key: Hashable) -> Any:
        """fetch(key)'s result (its exception re-raised), the next key's fetch started."""
        fut = self._pending.pop(key, None)
        if fut is None:  # not the key in flight: whatever is queued is stale
            for stale in self._pending.values():
                stale.cancel()
            self._pending.clear()
            fut = self._submit(key)
        else:
            self.prefetched += 1
        nxt = self._following(key)
        if nxt is not None and nxt not in self._pending:
            self._submit(nxt)
        t0 = time.perf_counter()
        try:
            return fut.result()
        finally:
            self.wait_s += time.perf_counter() - t0

    def close(self) -> None:
        """Cancel what is queued and stop the thread (a running fetch finishes on its own)."""
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._jobs.put(None)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
