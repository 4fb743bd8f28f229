"""Adaptation jobs: a bounded queue, one background worker thread (each job in a thread of its own that ends with it:
torch_threads.py), progress, cancellation, and job records on disk so a restart reports what it interrupted
(queued/running -> failed).

Shared records (`shared=True`: several servers, e.g. a cluster's replicas, share one store): each server runs its
own jobs and sees the others' through their records; a record's owner renews its heartbeat while the job is queued
or running, and a job whose owner died is reported failed by everyone (records.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..engine import Engine, ShuttingDown
from ..torch_threads import run_in_own_thread
from .data import Example
from .methods import METHODS
from .records import HEARTBEAT_S, JobRecords, as_seen
from .retrieve import retrieve
from .states import ACTIVE, ENDED, JobState
from .trainer import Cancelled, Progress, TrainConfig, train

log = logging.getLogger(__name__)
RETRIEVE = "retrieve"
INTERRUPTED = "interrupted: the server stopped while this job was queued or running; nothing was saved"


class QueueFull(RuntimeError):
    """Too many jobs are queued already (503)."""


class JobConflictError(RuntimeError):
    """The job cannot do that in its state, or another job holds its task (409); `field` names the culprit."""

    def __init__(self, message: str, field: str):
        self.field = field
        super().__init__(message)


@dataclass
class AdaptJob:
    id: str
    task: str
    method: str
    steps: int
    examples: int
    state: JobState = "queued"
    step: int = 0
    loss: float | None = None
    validation_loss: float | None = None
    validation_exact_match: float | None = None
    trainable_parameters: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int | None = None  # the task version written on success
    stopped_early: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    result: dict | None = None  # retrieve (and init "retrieve"): the mix and every candidate's loss
    owner: str | None = None  # shared records: the server running the job
    heartbeat: float | None = None  # shared records: when the owner last said it is alive

    def elapsed_s(self) -> float | None:
        return None if self.started is None else (self.finished or time.time()) - self.started

    def eta_s(self) -> float | None:
        if self.state != "running" or not self.step:
            return 0.0 if self.state in ENDED else None
        return self.elapsed_s() / self.step * (self.steps - self.step)


class JobManager:
    def __init__(self, engine: Engine, jobs_dir: Path, *, max_queued: int, shared: bool = False):
        """shared: other servers share jobs_dir (see the module's docstring)."""
        self.engine = engine
        self.jobs_dir = jobs_dir
        self.max_queued = max_queued
        self.shared = shared
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}" if shared else None
        self._own: dict[str, AdaptJob] = {}
        self._records = JobRecords(jobs_dir)
        self._pending: queue.Queue[tuple[AdaptJob, list[Example], TrainConfig] | None] = queue.Queue()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # a record's snapshot and its write go together
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name="adapt", daemon=True)
        self._stopped = threading.Event()
        self._heart = threading.Thread(target=self._beat, name="adapt-heartbeat", daemon=True)
        self._load_records()

    @property
    def jobs(self) -> dict[str, AdaptJob]:
        """The jobs this server knows, by id: its own and, with shared records, the other servers' as their
        records say now (a job whose owner died: failed)."""
        if not self.shared:
            return self._own
        others = {}
        for job_id, record in self._records.read_all().items():
            if job_id not in self._own and (job := _job_of(as_seen(record))) is not None:
                others[job_id] = job
        return {**others, **self._own}

    def start(self) -> None:
        self._thread.start()
        if self.shared:
            self._heart.start()

    def stop(self) -> None:
        """Refuse new jobs, cancel what is queued or running (nothing partial is written), wait for the worker."""
        with self._lock:
            self._accepting = False
            self._cancel.update(job.id for job in self._own.values() if job.state in ACTIVE)
        self._pending.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self._stopped.set()
        if self._heart.is_alive():
            self._heart.join(timeout=10)

    def submit(self, task: str, method: str, examples: list[Example], config: TrainConfig) -> AdaptJob:
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down: no new adaptation jobs")
            if any(j.task == task and j.state in ACTIVE for j in self.jobs.values()):
                raise JobConflictError(f"a job adapting task {task!r} is already queued or running", "task")
            if sum(j.state == "queued" for j in self._own.values()) >= self.max_queued:
                raise QueueFull(f"{self.max_queued} adaptation jobs are already queued")
            steps = 1 if method == RETRIEVE else config.steps  # retrieval is one pass, no gradient steps
            job = AdaptJob(uuid.uuid4().hex, task, method, steps, len(examples))
            self._own[job.id] = job
        self._save(job)
        self._pending.put((job, examples, config))
        return job

    def cancel(self, job_id: str) -> AdaptJob:
        """Cancel a queued job at once, or ask a running one to stop at its next step (it then ends
        "cancelled", nothing written). A finished job cannot be cancelled (JobConflictError). Another server's job
        (shared records): its owner is asked to, and cancels it within a heartbeat."""
        job = self._own.get(job_id)
        if job is None:
            return self._cancel_elsewhere(job_id)
        with self._lock:
            if job.state not in ACTIVE:
                raise JobConflictError(f"job {job_id} already ended ({job.state}); nothing to cancel", "job_id")
            if job.state == "queued":
                job.state, job.finished = "cancelled", time.time()
            else:
                self._cancel.add(job_id)
                job.cancel_requested = True
        self._save(job)
        return job

    def _cancel_elsewhere(self, job_id: str) -> AdaptJob:
        job = self.jobs[job_id]
        if job.state not in ACTIVE:
            raise JobConflictError(f"job {job_id} already ended ({job.state}); nothing to cancel", "job_id")
        self._records.ask_to_cancel(job_id)
        job.cancel_requested = True
        return job

    def _beat(self) -> None:
        """Shared records: renew the heartbeat of this server's queued and running jobs; act on cancel requests."""
        while not self._stopped.wait(HEARTBEAT_S):
            for job in [j for j in self._own.values() if j.state in ACTIVE]:
                if not self._records.take_cancel_request(job.id):
                    self._save(job)
                    continue
                with contextlib.suppress(JobConflictError):  # it ended meanwhile
                    self.cancel(job.id)

    def _work(self) -> None:
        while (item := self._pending.get()) is not None:
            job, examples, config = item
            if job.state == "queued" and job.id not in self._cancel:  # torch's thread ends with the job
                run_in_own_thread(self._run, job, examples, config)
            elif job.state == "queued":
                self._finish(job, "cancelled")

    def _run(self, job: AdaptJob, examples: list[Example], config: TrainConfig) -> None:
        job.state, job.started = "running", time.time()
        self._save(job)
        last_save = [time.monotonic()]

        def on_progress(progress: Progress) -> None:
            job.step, job.loss = progress.step, progress.loss
            job.validation_loss, job.validation_exact_match = progress.validation_loss, progress.validation_exact_match
            if time.monotonic() - last_save[0] > 2:
                last_save[0] = time.monotonic()
                self._save(job)

        try:
            job.version = (self._retrieve if job.method == RETRIEVE else self._train)(job, examples, config,
                                                                                     on_progress)
            self.engine.forget_task(job.task)  # its older versions
            self._finish(job, "succeeded")
        except Cancelled:
            self._finish(job, "cancelled")
        except Exception as exc:  # the job fails; the server goes on
            log.exception("adaptation job %s failed", job.id)
            self._finish(job, "failed", f"{type(exc).__name__}: {exc}")

    def _train(self, job: AdaptJob, examples: list[Example], config: TrainConfig, on_progress) -> int:
        method = METHODS[job.method](self.engine.store)
        job.trainable_parameters = method.trainable_parameters
        if config.init == "retrieve":
            start = retrieve(self.engine, examples, config.retrieve_k)
            job.result = start.as_dict()
            method.start_from(self.engine.store.skill_weights(start.mix))
        result = train(self.engine, method, examples, config, cancelled=lambda: job.id in self._cancel,
                       on_progress=on_progress)
        job.stopped_early = result.stopped_early
        return method.save(job.task, overwrite=config.overwrite).version

    def _retrieve(self, job: AdaptJob, examples: list[Example], config: TrainConfig, on_progress) -> int:
        """No gradient steps: the best mix of known tasks, persisted as a composed task."""
        found = retrieve(self.engine, examples, config.retrieve_k)
        job.result = found.as_dict()
        job.trainable_parameters = 0
        on_progress(Progress(step=1, loss=found.candidates[0].loss))
        return self.engine.store.save_composition(job.task, found.mix, overwrite=config.overwrite,
                                                  method=RETRIEVE).version

    def _finish(self, job: AdaptJob, state: JobState, error: str | None = None) -> None:
        job.state, job.finished, job.error = state, time.time(), error
        self._cancel.discard(job.id)
        self._save(job)

    # ---- records on disk ----------------------------------------------------------------
    def _save(self, job: AdaptJob) -> None:
        """Write the job's record. A folder that refuses it (full disk, read-only) costs only the record: this
        server keeps reporting the job from memory (other servers sharing the store do not see it)."""
        with self._write_lock:
            if self.shared:
                job.owner, job.heartbeat = self.owner, time.time()
            try:
                self._records.save(asdict(job))
            except OSError as exc:
                log.warning("cannot write the record of job %s in %s: %s", job.id, self.jobs_dir, exc)

    def _load_records(self) -> None:
        """Not shared: the records of an earlier run; what it left queued or running it interrupted. Shared: the
        other servers' records are read when asked for (`jobs`); temp files of a write in progress stay."""
        if self.shared:
            self._records.remove_partial_files(older_than_s=60)
            return
        self._records.remove_partial_files()
        for record in sorted(self._records.read_all().values(), key=lambda r: str(r.get("id"))):
            job = _job_of(record)
            if job is None:
                continue
            if job.state in ACTIVE:
                job.state, job.error, job.finished = "failed", INTERRUPTED, job.finished or time.time()
                self._save(job)
            self._own[job.id] = job


def _job_of(record: dict) -> AdaptJob | None:
    try:
        return AdaptJob(**record)
    except TypeError as exc:
        log.warning("ignoring unreadable job record %s (%s)", record.get("id"), exc)
        return None
