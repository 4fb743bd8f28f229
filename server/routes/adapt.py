"""POST /adapt (202 + job), GET /adapt, GET /adapt/{job}, DELETE /adapt/{job}: few-shot adaptation jobs."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from adapter_store import TaskConflictError, UnknownTaskError, validate_task_name

from ..adapt import AdaptJob, Example, JobManager, QueueFull, TrainConfig
from ..adapt.methods import METHODS
from ..deps import EngineDep, SettingsDep
from ..errors import ApiError
from ..schemas import AdaptJobList, AdaptJobOut, AdaptRequest, ErrorResponse
from ..security import MutatingKey, ReadingKey
from .validation import check_texts, invalid

router = APIRouter(tags=["adapt"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422, 503)}


def get_jobs(request: Request) -> JobManager:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise ApiError(503, "unavailable", "the model is still loading; GET /readyz says when it is ready")
    return jobs


def job_out(job: AdaptJob) -> AdaptJobOut:
    return AdaptJobOut(**asdict(job), elapsed_s=job.elapsed_s(), eta_s=job.eta_s())


@router.post("/adapt", status_code=202, response_model=AdaptJobOut, responses=ERRORS)
async def submit(body: AdaptRequest, request: Request, engine: EngineDep, settings: SettingsDep, _: MutatingKey):
    validate_task_name(body.task)
    _check_name_is_free(engine, body.task, body.overwrite)
    if len(body.examples) > settings.adapt_max_examples:
        raise invalid("examples", f"{len(body.examples)} examples; at most {settings.adapt_max_examples}")
    if body.steps > settings.adapt_max_steps:
        raise invalid("steps", f"{body.steps} steps; at most {settings.adapt_max_steps}")
    for i, example in enumerate(body.examples):
        check_texts([example.input], f"examples.{i}.input", engine, settings)
        check_texts([example.target], f"examples.{i}.target", engine, settings)
    config = TrainConfig(steps=body.steps, batch_size=body.batch_size, seed=body.seed,
                         learning_rate=body.learning_rate or METHODS[body.method].default_learning_rate,
                         validation_fraction=body.validation_fraction, max_seconds=settings.adapt_max_seconds,
                         max_new_tokens=settings.max_new_tokens)
    examples = [Example(e.input, e.target) for e in body.examples]
    try:
        job = get_jobs(request).submit(body.task, body.method, examples, config)
    except QueueFull as exc:
        raise ApiError(503, "overloaded", str(exc), headers={"Retry-After": "10"}) from exc
    return job_out(job)


def _check_name_is_free(engine, task: str, overwrite: bool) -> None:
    try:
        info = engine.store.task(task)
    except UnknownTaskError:
        return
    if info.kind != "adapted":
        raise TaskConflictError(f"task {task!r} is a pretrained task and cannot be replaced")
    if not overwrite:
        raise TaskConflictError(f"task {task!r} already exists; set overwrite=true to replace it (version goes up)")


@router.get("/adapt", response_model=AdaptJobList, dependencies=ReadingKey)
async def list_jobs(request: Request) -> AdaptJobList:
    jobs = sorted(get_jobs(request).jobs.values(), key=lambda j: j.created)
    return AdaptJobList(jobs=[job_out(j) for j in jobs])


@router.get("/adapt/{job_id}", response_model=AdaptJobOut, responses=ERRORS, dependencies=ReadingKey)
async def get_job(job_id: str, request: Request) -> AdaptJobOut:
    return job_out(_job(request, job_id))


@router.delete("/adapt/{job_id}", response_model=AdaptJobOut, responses=ERRORS)
async def cancel_job(job_id: str, request: Request, _: MutatingKey) -> AdaptJobOut:
    """202-like semantics in a 200: a running job shows cancel_requested until it stops (then "cancelled");
    a job that already ended is a 409."""
    _job(request, job_id)
    return job_out(get_jobs(request).cancel(job_id))


def _job(request: Request, job_id: str) -> AdaptJob:
    job = get_jobs(request).jobs.get(job_id)
    if job is None:
        raise ApiError(404, "unknown_job", f"unknown job {job_id!r}; GET /adapt lists the jobs", "job_id")
    return job
