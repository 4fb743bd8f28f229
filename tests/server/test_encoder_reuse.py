"""T5's encoder output reused (MHR_PREFIX_CACHE): a row with the same adapter and the same input as an earlier one
takes that row's cached encoder blocks and runs its decoder alone — the same text as computed afresh; another task,
or another input, never takes them; rows reusing and rows encoding in one admission both answer right."""

import pytest

from adapter_store import AdapterCache, AdapterStore
from server.engine import Engine, GenerateRow, SamplingParams, load_model
from tests.factories import save_bundle

GREEDY = SamplingParams(max_new_tokens=8, logprobs=0)


def engine_for(folder, **options) -> Engine:
    return Engine(load_model(folder / "model", device="cpu"), AdapterStore.open(folder / "inventory"),
                  AdapterCache(10**8), kv_block_size=4, **options)


@pytest.fixture(scope="module", params=["t5", "t5-gated"])
def engines(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_bundle(folder, request.param, sharp=False)  # log-probabilities far from 0: they show any change
    cached, fresh = engine_for(folder), engine_for(folder, prefix_cache=False)
    yield cached, fresh
    cached.close()
    fresh.close()


def _texts(engine, rows):
    """Each row's text and its tokens' log-probabilities (rounded: equal up to float noise)."""
    return [(c.text, [round(lp.logprob, 4) for lp in c.logprobs])
            for c in engine.generate([GenerateRow(t, x, GREEDY) for t, x in rows])]


def test_same_adapter_and_input_reuses_the_encoder_and_answers_the_same(engines):
    cached, fresh = engines
    kv = cached.loop.batch.kv
    first = [("task-0", "an input long enough for blocks")]
    assert _texts(cached, first) == _texts(fresh, first)
    hits = kv.encoder_hits
    assert _texts(cached, first) == _texts(fresh, first)
    assert kv.encoder_hits == hits + 1
    assert _texts(cached, [("task-1", "an input long enough for blocks")]) == \
        _texts(fresh, [("task-1", "an input long enough for blocks")])  # another task: encoded again
    assert _texts(cached, [("task-0", "an input long enough for block")]) == \
        _texts(fresh, [("task-0", "an input long enough for block")])  # another input (a prefix of it)
    assert kv.encoder_hits == hits + 1 and fresh.loop.batch.kv.encoder_hits == 0


def test_reusing_and_encoding_rows_admitted_together(engines):
    cached, fresh = engines
    kv = cached.loop.batch.kv
    _texts(cached, [("task-2", "seen before"), ("__mu__", "also seen")])
    hits = kv.encoder_hits
    rows = [("task-2", "seen before"), ("task-0", "never seen"), ("__mu__", "also seen"), ("task-1", "new too")]
    assert _texts(cached, rows) == _texts(fresh, rows)
    assert kv.encoder_hits == hits + 2
    assert kv.blocks.used == 0  # every row's blocks went back (shared encoder blocks included)


def test_hits_show_in_the_loop_stats(engines):
    cached, _ = engines
    _texts(cached, [("task-1", "counted")])
    before = cached.stats().encoder_cache_hits
    _texts(cached, [("task-1", "counted")])
    assert cached.stats().encoder_cache_hits == before + 1
