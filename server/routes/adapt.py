"""POST /adapt (202 + job), GET /adapt, GET /adapt/{job}, DELETE /adapt/{job}: few-shot adaptation jobs."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from ..adapt import AdaptJob, Example, TrainConfig
from ..adapt.methods import METHODS
from ..deps import EngineDep, JobsDep, SettingsDep
from ..errors import ApiError
from ..schemas import AdaptJobList, AdaptJobOut, AdaptRequest, ErrorResponse
from ..security import MutatingKey, ReadingKey
from .validation import check_texts, invalid

router = APIRouter(tags=["adapt"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422, 503)}


def job_out(job: AdaptJob) -> AdaptJobOut:
    return AdaptJobOut(**asdict(job), elapsed_s=job.elapsed_s(), eta_s=job.eta_s())


@router.post("/adapt", status_code=202, response_model=AdaptJobOut, responses=ERRORS)
async def submit(body: AdaptRequest, engine: EngineDep, jobs: JobsDep, settings: SettingsDep, _: MutatingKey):
    engine.store.check_writable(body.task, overwrite=body.overwrite)
    if len(body.examples) > settings.adapt_max_examples:
        raise invalid("examples", f"{len(body.examples)} examples; at most {settings.adapt_max_examples}")
    if body.steps > settings.adapt_max_steps:
        raise invalid("steps", f"{body.steps} steps; at most {settings.adapt_max_steps}")
    if body.init == "retrieve" and body.method not in ("mhr-z", "poly-z"):
        raise invalid("init", f"init retrieve starts routing logits: only for mhr-z and poly-z, not {body.method}")
    for i, example in enumerate(body.examples):
        check_texts([example.input], f"examples.{i}.input", engine, settings)
        check_texts([example.target], f"examples.{i}.target", engine, settings)
    default_rate = METHODS[body.method].default_learning_rate if body.method in METHODS else 0.0
    config = TrainConfig(steps=body.steps, batch_size=body.batch_size, seed=body.seed,
                         learning_rate=body.learning_rate or default_rate,
                         validation_fraction=body.validation_fraction, max_seconds=settings.adapt_max_seconds,
                         max_new_tokens=settings.max_new_tokens, overwrite=body.overwrite, init=body.init,
                         retrieve_k=body.k)
    examples = [Example(e.input, e.target) for e in body.examples]
    return job_out(jobs.submit(body.task, body.method, examples, config))


@router.get("/adapt", response_model=AdaptJobList, dependencies=ReadingKey)
async def list_jobs(jobs: JobsDep) -> AdaptJobList:
    return AdaptJobList(jobs=[job_out(j) for j in sorted(jobs.jobs.values(), key=lambda j: j.created)])


@router.get("/adapt/{job_id}", response_model=AdaptJobOut, responses=ERRORS, dependencies=ReadingKey)
async def get_job(job_id: str, jobs: JobsDep) -> AdaptJobOut:
    return job_out(_job(jobs, job_id))


@router.delete("/adapt/{job_id}", response_model=AdaptJobOut, responses=ERRORS)
async def cancel_job(job_id: str, jobs: JobsDep, _: MutatingKey) -> AdaptJobOut:
    """202-like semantics in a 200: a running job shows cancel_requested until it stops (then "cancelled");
    a job that already ended is a 409."""
    return job_out(jobs.cancel(_job(jobs, job_id).id))


def _job(jobs, job_id: str) -> AdaptJob:
    job = jobs.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "unknown_job", f"unknown job {job_id!r}; GET /adapt lists the jobs", "job_id")
    return job
