"""Client (blocking) and AsyncClient (asyncio): the same methods, the same options, the same exceptions.

Each method pair shares one docstring, written in ``_docs.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from . import _base as b
from . import _docs as d
from ._docs import documented
from .models import AdaptJob, GenerateResponse, Readiness, ScoreResponse, StreamEvent, TaskInfo

T = TypeVar("T")
Progress = Callable[[AdaptJob], Any]


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _sampling(max_new_tokens, min_new_tokens, ignore_eos, do_sample, temperature, top_p, top_k, seed, num_beams,
              stop) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "ignore_eos": ignore_eos,
            "do_sample": do_sample or None, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
            "num_beams": num_beams, "stop": stop}


def _guided(guided: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return dict(guided) if guided is not None else None


def _training(method, init, k, steps, learning_rate, batch_size, seed, validation_fraction,
              overwrite) -> dict[str, Any]:
    return {"method": method, "init": init, "k": k, "steps": steps, "learning_rate": learning_rate,
            "batch_size": batch_size, "seed": seed, "validation_fraction": validation_fraction,
            "overwrite": overwrite or None}


class Client:
    """Blocking client for mhr-serve. Use it as a context manager (or call ``close()``).

    Each method documents its parameters (meaning, units, default, range), what it returns and what it raises:
    ``help(Client.generate)``. Every exception is an ``MhrError`` (see ``client.exceptions``).
    """

    @documented(d.INIT)
    def __init__(self, base_url: str = b.DEFAULT_URL, *, api_key: str | None = None, timeout: float | None = 60.0,
                 retries: int = 2, transport: httpx.BaseTransport | None = None,
                 headers: dict[str, str] | None = None):
        self.config = b.Config(base_url, api_key, timeout, retries, dict(headers or {}))
        self._http = httpx.Client(transport=transport, **self.config.http_options())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @documented(d.CLOSE)
    def close(self) -> None:
        self._http.close()

    def _call(self, call: b.Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, json=call.json)
            except httpx.TransportError as exc:
                delay = b.retry_delay(call, attempt, self.config.retries, None)
                if delay is None:
                    raise b.transport_error(exc, call.method, call.path) from exc
            else:
                delay = b.retry_delay(call, attempt, self.config.retries, response)
                if delay is None:
                    return b.finish(call, response)
                response.close()
            _sleep(delay)
            attempt += 1

    @documented(d.GENERATE)
    def generate(self, task: b.Task, inputs: str | list[str], *, max_new_tokens: int | None = None,
                 min_new_tokens: int | None = None, ignore_eos: bool | None = None, do_sample: bool = False,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, num_beams: int | None = None, stop: list[str] | None = None,
                 logprobs: int | None = None, guided: Mapping[str, Any] | None = None) -> GenerateResponse:
        options = _sampling(max_new_tokens, min_new_tokens, ignore_eos, do_sample, temperature, top_p, top_k, seed,
                            num_beams, stop)
        extra = {"logprobs": logprobs, "guided": _guided(guided)}
        return self._call(b.generate_call(task, inputs, {**options, **extra}))

    @documented(d.STREAM)
    def stream(self, task: b.Task, inputs: str | list[str], *, max_new_tokens: int | None = None,
               min_new_tokens: int | None = None, ignore_eos: bool | None = None, do_sample: bool = False,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               seed: int | None = None, num_beams: int | None = None,
               stop: list[str] | None = None, guided: Mapping[str, Any] | None = None) -> Iterator[StreamEvent]:
        options = _sampling(max_new_tokens, min_new_tokens, ignore_eos, do_sample, temperature, top_p, top_k, seed,
                            num_beams, stop)
        call = b.generate_call(task, inputs, {**options, "guided": _guided(guided)}, stream=True)
        parser = b.SSEParser()
        try:
            with self._http.stream(call.method, call.path, json=call.json) as response:
                if response.is_error:
                    response.read()
                    b.finish(call, response)
                for line in response.iter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise b.transport_error(exc, call.method, call.path) from exc
        event = parser.close()
        if event is not None:
            yield event

    @documented(d.SCORE)
    def score(self, task: b.Task, inputs: str | list[str], choices: list[str] | list[list[str]]) -> ScoreResponse:
        return self._call(b.score_call(task, inputs, choices))

    @documented(d.TASKS)
    def tasks(self) -> list[TaskInfo]:
        return self._call(b.tasks_call())

    @documented(d.TASK)
    def task(self, name: str) -> TaskInfo:
        return self._call(b.task_call(name))

    @documented(d.COMPOSE)
    def compose(self, name: str, mix: Mapping[str, float], *, overwrite: bool = False) -> TaskInfo:
        return self._call(b.compose_call(name, mix, overwrite))

    @documented(d.DELETE_TASK)
    def delete_task(self, name: str) -> TaskInfo:
        return self._call(b.task_call(name, "DELETE"))

    @documented(d.ADAPT)
    def adapt(self, task: str, examples: Iterable[b.Example], *, method: str = "mhr-z", init: str | None = None,
              k: int | None = None, steps: int | None = None, learning_rate: float | None = None,
              batch_size: int | None = None, seed: int | None = None, validation_fraction: float | None = None,
              overwrite: bool = False) -> AdaptJob:
        options = _training(method, init, k, steps, learning_rate, batch_size, seed, validation_fraction, overwrite)
        return self._call(b.adapt_call(task, examples, options))

    @documented(d.JOB)
    def job(self, job_id: str | AdaptJob) -> AdaptJob:
        return self._call(b.job_call(job_id))

    @documented(d.JOBS)
    def jobs(self) -> list[AdaptJob]:
        return self._call(b.jobs_call())

    @documented(d.CANCEL)
    def cancel(self, job_id: str | AdaptJob) -> AdaptJob:
        return self._call(b.job_call(job_id, "DELETE"))

    @documented(d.WAIT)
    def wait(self, job_id: str | AdaptJob, *, poll_interval: float = 0.5, timeout: float | None = None,
             on_progress: Progress | None = None) -> AdaptJob:
        deadline = b.Deadline(timeout, poll_interval)
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.done:
                return job
            _sleep(deadline.next_sleep(job))

    @documented(d.EXPORT)
    def export(self, task: str, dest_dir: str | Path) -> Path:
        return b.extract_zip(self._call(b.export_call(task)), dest_dir)

    @documented(d.HEALTH)
    def health(self) -> dict[str, Any]:
        return self._call(b.health_call())

    @documented(d.READY)
    def ready(self) -> Readiness:
        return self._call(b.ready_call())


class AsyncClient:
    """The asyncio twin of Client: the same constructor and methods, awaited; ``stream()`` is an async iterator.

    Use it as ``async with AsyncClient(...) as mhr`` (or call ``aclose()``). Each method shares its Client twin's
    documentation: ``help(AsyncClient.generate)``.
    """

    @documented(d.INIT)
    def __init__(self, base_url: str = b.DEFAULT_URL, *, api_key: str | None = None, timeout: float | None = 60.0,
                 retries: int = 2, transport: httpx.AsyncBaseTransport | None = None,
                 headers: dict[str, str] | None = None):
        self.config = b.Config(base_url, api_key, timeout, retries, dict(headers or {}))
        self._http = httpx.AsyncClient(transport=transport, **self.config.http_options())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @documented(d.CLOSE)
    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, call: b.Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, json=call.json)
            except httpx.TransportError as exc:
                delay = b.retry_delay(call, attempt, self.config.retries, None)
                if delay is None:
                    raise b.transport_error(exc, call.method, call.path) from exc
            else:
                delay = b.retry_delay(call, attempt, self.config.retries, response)
                if delay is None:
                    return b.finish(call, response)
                await response.aclose()
            await _async_sleep(delay)
            attempt += 1

    @documented(d.GENERATE)
    async def generate(self, task: b.Task, inputs: str | list[str], *, max_new_tokens: int | None = None,
                       min_new_tokens: int | None = None, ignore_eos: bool | None = None, do_sample: bool = False,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       seed: int | None = None, num_beams: int | None = None, stop: list[str] | None = None,
                       logprobs: int | None = None, guided: Mapping[str, Any] | None = None) -> GenerateResponse:
        options = _sampling(max_new_tokens, min_new_tokens, ignore_eos, do_sample, temperature, top_p, top_k, seed,
                            num_beams, stop)
        extra = {"logprobs": logprobs, "guided": _guided(guided)}
        return await self._call(b.generate_call(task, inputs, {**options, **extra}))

    @documented(d.STREAM)
    async def stream(self, task: b.Task, inputs: str | list[str], *, max_new_tokens: int | None = None,
                     min_new_tokens: int | None = None, ignore_eos: bool | None = None, do_sample: bool = False,
                     temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                     seed: int | None = None, num_beams: int | None = None,
                     stop: list[str] | None = None, guided: Mapping[str, Any] | None = None
                     ) -> AsyncIterator[StreamEvent]:
        options = _sampling(max_new_tokens, min_new_tokens, ignore_eos, do_sample, temperature, top_p, top_k, seed,
                            num_beams, stop)
        call = b.generate_call(task, inputs, {**options, "guided": _guided(guided)}, stream=True)
        parser = b.SSEParser()
        try:
            async with self._http.stream(call.method, call.path, json=call.json) as response:
                if response.is_error:
                    await response.aread()
                    b.finish(call, response)
                async for line in response.aiter_lines():
                    event = parser.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise b.transport_error(exc, call.method, call.path) from exc
        event = parser.close()
        if event is not None:
            yield event

    @documented(d.SCORE)
    async def score(self, task: b.Task, inputs: str | list[str],
                    choices: list[str] | list[list[str]]) -> ScoreResponse:
        return await self._call(b.score_call(task, inputs, choices))

    @documented(d.TASKS)
    async def tasks(self) -> list[TaskInfo]:
        return await self._call(b.tasks_call())

    @documented(d.TASK)
    async def task(self, name: str) -> TaskInfo:
        return await self._call(b.task_call(name))

    @documented(d.COMPOSE)
    async def compose(self, name: str, mix: Mapping[str, float], *, overwrite: bool = False) -> TaskInfo:
        return await self._call(b.compose_call(name, mix, overwrite))

    @documented(d.DELETE_TASK)
    async def delete_task(self, name: str) -> TaskInfo:
        return await self._call(b.task_call(name, "DELETE"))

    @documented(d.ADAPT)
    async def adapt(self, task: str, examples: Iterable[b.Example], *, method: str = "mhr-z",
                    init: str | None = None, k: int | None = None, steps: int | None = None,
                    learning_rate: float | None = None, batch_size: int | None = None, seed: int | None = None,
                    validation_fraction: float | None = None, overwrite: bool = False) -> AdaptJob:
        options = _training(method, init, k, steps, learning_rate, batch_size, seed, validation_fraction, overwrite)
        return await self._call(b.adapt_call(task, examples, options))

    @documented(d.JOB)
    async def job(self, job_id: str | AdaptJob) -> AdaptJob:
        return await self._call(b.job_call(job_id))

    @documented(d.JOBS)
    async def jobs(self) -> list[AdaptJob]:
        return await self._call(b.jobs_call())

    @documented(d.CANCEL)
    async def cancel(self, job_id: str | AdaptJob) -> AdaptJob:
        return await self._call(b.job_call(job_id, "DELETE"))

    @documented(d.WAIT)
    async def wait(self, job_id: str | AdaptJob, *, poll_interval: float = 0.5, timeout: float | None = None,
                   on_progress: Progress | None = None) -> AdaptJob:
        deadline = b.Deadline(timeout, poll_interval)
        while True:
            job = await self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.done:
                return job
            await _async_sleep(deadline.next_sleep(job))

    @documented(d.EXPORT)
    async def export(self, task: str, dest_dir: str | Path) -> Path:
        data = await self._call(b.export_call(task))
        return await asyncio.to_thread(b.extract_zip, data, dest_dir)

    @documented(d.HEALTH)
    async def health(self) -> dict[str, Any]:
        return await self._call(b.health_call())

    @documented(d.READY)
    async def ready(self) -> Readiness:
        return await self._call(b.ready_call())
