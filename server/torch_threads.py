"""Where torch runs: on the serving loop's thread, or in a thread that ends with its work.

Torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that ran parallel work, for as long
as that thread lives; once the process has more of them than cores, it stops spinning between parallel regions, and
each parallel region of the serving loop then waits for a sleeping worker to wake. So no long-lived thread but the
serving loop may call torch: not the event loop's (request validation is torch-free), not asyncio's pooled threads
(asyncio.to_thread), not the adaptation worker (each job runs in a thread of its own).
Measured on 2 cores: a 512 x 512 linear of one row on a second thread, 10 us alone, 87 us once the main thread had
run one; the demo over HTTP, one client, 551 tokens/s before and 196 after a single /route/explain had built
Arrow's library in asyncio's pooled thread (and stayed there for the server's life). The random T5 of
bench/serving.py, a 16-row step without adapters: built in a thread that ended 18.5-21.4 ms, in the main thread
25.7-28.3. tests/server/test_torch_threads.py watches every thread the app starts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """await fn(*args, **kwargs) run in a new thread that ends with it (asyncio.to_thread's stay in a pool)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(setter, value) -> None:
        if not done.done():
            setter(value)

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(settle, done.set_result, result)

    _thread(run, fn).start()
    return await done


def run_in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a new thread that ends with it, waited for here."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            box["error"] = exc

    thread = _thread(run, fn)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _thread(run: Callable[[], None], fn: Callable) -> threading.Thread:
    return threading.Thread(target=run, name=f"mhr-{getattr(fn, '__name__', 'work')}", daemon=True)
