"""POST /route/explain: how Arrow routes one input — per layer that reads it, the top skills (or tasks) and their
weights averaged over its tokens, and the average over layers."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import EngineDep, MetricsDep, SettingsDep
from ..schemas import ErrorResponse, ExpertWeight, ExplainRequest, ExplainResponse, LayerRouting
from ..security import ReadingKey
from ..torch_threads import in_own_thread
from .validation import arrow_spec, check_texts

router = APIRouter(tags=["generate"])
ERRORS = {code: {"model": ErrorResponse} for code in (422, 503)}


@router.post("/route/explain", response_model=ExplainResponse, responses=ERRORS, dependencies=ReadingKey)
async def explain(body: ExplainRequest, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep):
    spec = arrow_spec(engine, body.task)
    check_texts([body.input], "input", engine, settings)
    metrics.count_task("arrow")
    found = await in_own_thread(engine.explain, spec, body.input)
    layers = [LayerRouting(layer=name, top=_top(weights, body.top)) for name, weights in found.layers.items()]
    return ExplainResponse(task=spec.name, granularity=spec.granularity, experts=list(found.experts),
                           average=found.average, layers=layers)


def _top(weights: dict[str, float], n: int) -> list[ExpertWeight]:
    best = sorted(weights.items(), key=lambda item: -item[1])[:n]
    return [ExpertWeight(expert=expert, weight=weight) for expert, weight in best if weight > 0]
