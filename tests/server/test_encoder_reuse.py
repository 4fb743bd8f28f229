"""T5's encoder output reused (MHR_PREFIX_CACHE): a row with the same adapter and the same input as an earlier one
takes that row's cached encoder blocks and runs its decoder alone — the same text as computed afresh; another task,
or another input, never takes them; rows reusing and rows encoding in one admission both answer right. A joining
T5 row runs its encoder only, no decoder forward of its own."""

import pytest

from adapter_store import AdapterCache, AdapterStore
from server.engine import Engine, GenerateRow, SamplingParams, load_model
from tests.factories import save_bundle
from tests.server.test_serving_loop import TEXTS, staggered

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

def test_t5_rows_join_with_their_encoder_only_and_decode_their_start_token_beside_the_others(tmp_path, monkeypatch):
    """A T5 row joining the running batch runs its encoder and each layer's cross-attention keys and values, and no
    decoder forward of its own: its start token is its first decoding step, with the running rows (the decoder runs
    once per step, never for a join). The texts equal each row alone."""
    save_bundle(tmp_path, "t5")
    engine = engine_for(tmp_path, prefix_cache=False)  # every join encodes
    batch = engine.loop.batch
    calls = {"decoder": 0, "steps": 0}
    batch.kv.model.get_decoder().register_forward_hook(lambda *_: calls.update(decoder=calls["decoder"] + 1))
    step = batch.step

    def counted_step():
        calls["steps"] += 1
        return step()

    monkeypatch.setattr(batch, "step", counted_step)
    rows = [GenerateRow(f"task-{t}", x, SamplingParams(max_new_tokens=n))
            for t, x, n in zip([0, 2, 1, 0], TEXTS, [12, 6, 9, 5], strict=False)]
    joined = staggered(engine, rows)
    assert calls["decoder"] == calls["steps"] > 0
    alone = [engine.generate([GenerateRow(r.task, r.text, r.params)])[0] for r in rows]
    assert [c.text for c in joined] == [c.text for c in alone]
    engine.close()


def test_cross_gathers_are_kept_between_steps_and_cleared_when_encoder_keys_are_written(tmp_path, monkeypatch):
    """A T5 decoding step keeps its cross-attention gathers while the batch stays the same
    (kept_gathers.CrossGathers): most steps gather nothing. Blocks a leaving row freed may come back in a joining
    row's table holding new keys, so every write of encoder keys clears what is kept. Texts equal each row alone."""
    save_bundle(tmp_path, "t5")
    engine = engine_for(tmp_path, prefix_cache=False)  # every join encodes
    kv = engine.loop.batch.kv
    counts = {"get": 0, "gather": 0, "clear": 0, "encode": 0}
    get, clear, encode = kv.cross_gathers.get, kv.cross_gathers.clear, kv.encode

    def counted_get(layer, group, gather):
        counts["get"] += 1
        return get(layer, group, lambda: (counts.update(gather=counts["gather"] + 1), gather())[1])

    monkeypatch.setattr(kv.cross_gathers, "get", counted_get)
    monkeypatch.setattr(kv.cross_gathers, "clear", lambda: (counts.update(clear=counts["clear"] + 1), clear()))
    monkeypatch.setattr(kv, "encode", lambda *a, **k: (counts.update(encode=counts["encode"] + 1), encode(*a, **k)))
    same_length = ["hello there", "other input", "third input", "last inputs"]  # their encoder keys group
    rows = [GenerateRow(f"task-{t}", x, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for t, x, n in zip([0, 2, 1, 0], same_length, [12, 6, 9, 5], strict=True)]
    joined = staggered(engine, rows)
    assert counts["clear"] == counts["encode"] > 1
    assert 0 < counts["gather"] < counts["get"]  # steps between joins gather nothing
    alone = [engine.generate([GenerateRow(r.task, r.text, r.params)])[0] for r in rows]
    assert [c.text for c in joined] == [c.text for c in alone]
    engine.close()
