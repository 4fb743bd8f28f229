"""POST /score: rank classification — the log-likelihood of each choice given the input, and the best."""

from __future__ import annotations

from fastapi import APIRouter

from adapter_store.arrow import ArrowSpec

from ..deps import AdmissionDep, EngineDep, MetricsDep, SettingsDep
from ..engine import ScoreRow
from ..schemas import ChoiceScore, ErrorResponse, ScoreRequest, ScoreResponse, ScoreResult
from ..security import ReadingKey
from ..torch_threads import in_own_thread
from .validation import check_texts, invalid, mean_routing, task_and_texts, version_served

router = APIRouter(tags=["score"])
ERRORS = {code: {"model": ErrorResponse} for code in (404, 422, 503)}


@router.post("/score", response_model=ScoreResponse, responses=ERRORS, dependencies=ReadingKey)
async def score(body: ScoreRequest, engine: EngineDep, admission: AdmissionDep, settings: SettingsDep,
                metrics: MetricsDep):
    target, texts, _ = task_and_texts(engine, metrics, settings, body.task, body.inputs)
    choices = _choices_per_input(body.choices, len(texts))
    for i, options in enumerate(choices):
        if len(options) > settings.max_choices:
            raise invalid("choices", f"{len(options)} choices; at most {settings.max_choices}")
        check_texts(options, f"choices.{i}" if isinstance(body.choices[0], list) else "choices", engine, settings)
    scored = await admission.score([ScoreRow(target.ref, t, c) for t, c in zip(texts, choices, strict=True)])
    routing = None
    if isinstance(target.ref, ArrowSpec):  # one more prefill per input, to report how its tokens were routed
        found = await in_own_thread(engine.explain_many, target.ref, texts)
        routing = mean_routing([f.average for f in found])
    return ScoreResponse(task=target.name, version=version_served(target, scored[0].version),
                         results=[_result(s.choices) for s in scored], routing=routing)


def _choices_per_input(choices: list[str] | list[list[str]], n_inputs: int) -> list[list[str]]:
    if isinstance(choices[0], str):
        return [list(choices)] * n_inputs
    if len(choices) != n_inputs:
        raise invalid("choices", f"{len(choices)} lists of choices for {n_inputs} inputs; give one list per input")
    return [list(c) for c in choices]


def _result(scores) -> ScoreResult:
    out = [ChoiceScore(choice=s.choice, logprob_sum=s.logprob_sum, logprob_mean=s.logprob_mean, tokens=s.tokens)
           for s in scores]
    best = max(range(len(out)), key=lambda i: out[i].logprob_sum)
    best_mean = max(range(len(out)), key=lambda i: out[i].logprob_mean)
    return ScoreResult(scores=out, best=out[best].choice, best_index=best, best_by_mean_index=best_mean)
