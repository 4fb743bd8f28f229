"""What Client and AsyncClient share: configuration, request building, retry policy, SSE parsing, zip extraction.

Every API call is described once here as a ``Call`` (method, path, JSON body, how to parse the answer); the two
clients only differ in how they send it (blocking or awaited).
"""

from __future__ import annotations

import io
import json
import shutil
import stat
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from .exceptions import ExportError, MhrError, TransportError, WaitTimeout, parse_retry_after, raise_for_error
from .models import AdaptJob, GenerateResponse, Readiness, ScoreResponse, StreamEvent, TaskInfo

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})
MAX_BACKOFF_S = 30.0
USER_AGENT = "mhr-client/0.1.0"

Example = tuple[str, str] | Sequence[str] | Mapping[str, str]
Task = str | Mapping[str, Any]  # a task name, a mix {task: weight}, or an Arrow route {"route": "arrow", …}


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request: ``parse`` turns a successful (or ``accept``-ed) response into the result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    accept: tuple[int, ...] = ()
    retry: bool = True

    @property
    def retryable(self) -> bool:
        return self.retry and self.method in IDEMPOTENT


@dataclass
class Config:
    base_url: str = DEFAULT_URL
    api_key: str | None = None
    timeout: float | None = 60.0
    retries: int = 2
    headers: dict[str, str] = field(default_factory=dict)

    def http_options(self) -> dict[str, Any]:
        headers = {"User-Agent": USER_AGENT, **self.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return {"base_url": self.base_url, "headers": headers, "timeout": httpx.Timeout(self.timeout)}


def _segment(name: str) -> str:
    return quote(name, safe="")


def _model(cls: Any, key: str | None = None) -> Callable[[httpx.Response], Any]:
    def parse(response: httpx.Response) -> Any:
        data = response.json()
        return cls.model_validate(data[key] if key else data)
    return parse


def _list_of(cls: Any, key: str) -> Callable[[httpx.Response], list[Any]]:
    return lambda response: [cls.model_validate(item) for item in response.json()[key]]


def present(**options: Any) -> dict[str, Any]:
    """Only the options that were given: None means "the server's default"."""
    return {key: value for key, value in options.items() if value is not None}


def task_body(task: Task) -> str | dict[str, Any]:
    """A name as it is; an Arrow route {"route": "arrow", "over", "top_k", "temperature"} as it is; a mix
    {task: weight} as {"mix": {...}} (the server checks and normalises the weights)."""
    if isinstance(task, str):
        return task
    if task.get("route") == "arrow":
        return dict(task)
    return {"mix": dict(task)}


def generate_call(task: Task, inputs: str | list[str], options: dict[str, Any], *, stream: bool = False) -> Call:
    body = {"task": task_body(task), "inputs": inputs, **present(**options)}
    if stream:
        body["stream"] = True
    return Call("POST", "/generate", _model(GenerateResponse), body)


def score_call(task: Task, inputs: str | list[str], choices: list[str] | list[list[str]]) -> Call[ScoreResponse]:
    body = {"task": task_body(task), "inputs": inputs, "choices": choices}
    return Call("POST", "/score", _model(ScoreResponse), body)


def tasks_call() -> Call[list[TaskInfo]]:
    return Call("GET", "/tasks", _list_of(TaskInfo, "tasks"))


def task_call(name: str, method: str = "GET") -> Call[TaskInfo]:
    return Call(method, f"/tasks/{_segment(name)}", _model(TaskInfo))


def compose_call(name: str, mix: Mapping[str, float], overwrite: bool) -> Call[TaskInfo]:
    body = {"name": name, "mix": dict(mix), **present(overwrite=overwrite or None)}
    return Call("POST", "/tasks", _model(TaskInfo), body)


def examples_body(examples: Iterable[Example]) -> list[dict[str, str]]:
    """(input, target) pairs or {"input", "target"} mappings -> the JSON the server expects."""
    out = []
    for i, example in enumerate(examples):
        if isinstance(example, Mapping):
            if "input" not in example or "target" not in example:
                raise ValueError(f"example {i}: a mapping needs 'input' and 'target' keys")
            out.append({"input": example["input"], "target": example["target"]})
        elif isinstance(example, Sequence) and not isinstance(example, str) and len(example) == 2:
            out.append({"input": example[0], "target": example[1]})
        else:
            raise ValueError(f"example {i}: expected an (input, target) pair or a mapping, got {example!r}")
    return out


def adapt_call(task: str, examples: Iterable[Example], options: dict[str, Any]) -> Call[AdaptJob]:
    body = {"task": task, "examples": examples_body(examples), **present(**options)}
    return Call("POST", "/adapt", _model(AdaptJob), body)


def job_call(job_id: str | AdaptJob, method: str = "GET") -> Call[AdaptJob]:
    job_id = job_id.id if isinstance(job_id, AdaptJob) else job_id
    return Call(method, f"/adapt/{_segment(job_id)}", _model(AdaptJob))


def jobs_call() -> Call[list[AdaptJob]]:
    return Call("GET", "/adapt", _list_of(AdaptJob, "jobs"))


def export_call(task: str) -> Call[bytes]:
    return Call("GET", f"/tasks/{_segment(task)}/lora", lambda response: response.content)


def health_call() -> Call[dict]:
    return Call("GET", "/healthz", lambda response: response.json())


def ready_call() -> Call[Readiness]:
    """A probe: "loading" (503) is an answer, not an error, and is not retried."""
    return Call("GET", "/readyz", _model(Readiness), accept=(503,), retry=False)


def finish(call: Call[T], response: httpx.Response) -> T:
    if response.status_code not in call.accept:
        raise_for_error(response)
    try:
        return call.parse(response)
    except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise MhrError(f"unexpected answer to {call.method} {call.path}: {exc}") from exc


def retry_delay(call: Call, attempt: int, retries: int, response: httpx.Response | None) -> float | None:
    """Seconds to wait before trying ``call`` again, or None to stop (POST is never retried).

    ``response`` None means a transport error; only 503 answers are retried, after their Retry-After.
    """
    if not call.retryable or attempt >= retries:
        return None
    if response is not None and response.status_code != 503:
        return None
    retry_after = parse_retry_after(response.headers.get("retry-after")) if response is not None else None
    delay = retry_after if retry_after is not None else 0.25 * 2**attempt
    return min(delay, MAX_BACKOFF_S)


def transport_error(exc: httpx.TransportError, method: str, path: str) -> TransportError:
    try:
        url = str(exc.request.url)
    except RuntimeError:  # raised without a request attached
        url = path
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return TransportError(f"{method} {url} {kind}: {exc or type(exc).__name__}")


class SSEParser:
    """Feed it lines of a text/event-stream; it returns the StreamEvents (raising on an ``error`` event)."""

    def __init__(self) -> None:
        self.event: str | None = None
        self.data: list[str] = []
        self.done = False

    def feed(self, line: str) -> StreamEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None

    def close(self) -> StreamEvent | None:
        event = self._dispatch()
        if not self.done and event is None:
            raise TransportError("the event stream ended before its 'done' event")
        return event

    def _dispatch(self) -> StreamEvent | None:
        event, data = self.event or "message", "\n".join(self.data)
        self.event, self.data = None, []
        if not data:
            return None
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise MhrError(f"malformed server-sent event {data[:200]!r}") from exc
        if event == "error":
            raise_for_error(httpx.Response(500, json=payload))
            raise TransportError(f"stream error: {payload}")  # raise_for_error always raises for 500
        if event == "done":
            self.done = True
            return StreamEvent(response=GenerateResponse.model_validate(payload))
        if event == "message":
            return StreamEvent(index=payload["index"], text=payload["text"])
        return None


class Deadline:
    """wait()'s clock: how long to sleep before the next poll, and the WaitTimeout once it has passed."""

    def __init__(self, timeout: float | None, poll_interval: float):
        self.end = None if timeout is None else time.monotonic() + timeout
        self.timeout, self.poll_interval = timeout, poll_interval

    def next_sleep(self, job: AdaptJob) -> float:
        if self.end is None:
            return self.poll_interval
        left = self.end - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"job {job.id} is still {job.state} after {self.timeout}s", job)
        return min(self.poll_interval, left)


def _is_symlink(member: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(member.external_attr >> 16)


def _target(dest: Path, member: zipfile.ZipInfo) -> Path:
    name = member.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ":" in parts[0] or ".." in parts or _is_symlink(member):
        raise ExportError(f"refusing unsafe archive entry {member.filename!r}")
    target = dest.joinpath(*parts).resolve()
    if not target.is_relative_to(dest):
        raise ExportError(f"refusing archive entry {member.filename!r}: it would land outside {dest}")
    return target


def extract_zip(data: bytes, dest_dir: str | Path) -> Path:
    """Unpack a zip into ``dest_dir`` after checking every entry stays inside it; returns the top folder."""
    dest = Path(dest_dir).resolve()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ExportError(f"the server's answer is not a zip archive: {exc}") from exc
    with archive:
        members = [(member, _target(dest, member)) for member in archive.infolist()]
        for member, target in members:
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
    tops = {PurePosixPath(m.filename.replace("\\", "/")).parts[0] for m, _ in members}
    return dest / tops.pop() if len(tops) == 1 and any("/" in m.filename for m, _ in members) else dest
