"""Requests that arrive together sharing a prompt prefix (a system prompt, a few-shot template) compute it once: the
first prefills it, the others wait in `prefilling` and take its blocks from the prefix cache — whether their prompts
are short or prefilled in chunks — and every answer equals an engine without the cache."""

import pytest

from server.engine import GenerateRow, SamplingParams
from tests.factories import engine_for, save_bundle

PREFIX = "a system prompt shared by many requests, " * 2  # 84 bytes: 5 full blocks of 16 with the BOS
PARAMS = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_bundle(folder, "llama")
    uncached = engine_for(folder, prefix_cache=False)
    yield folder, uncached
    uncached.close()


@pytest.mark.parametrize("chunk", [None, 16])
def test_a_prefix_shared_by_rows_arriving_together_is_computed_once(llama, chunk):
    folder, uncached = llama
    engine = engine_for(folder, prefill_chunk=chunk)
    rows = [GenerateRow("task-0", PREFIX + suffix, PARAMS) for suffix in ("one", "two", "three", "four")]
    assert [c.text for c in engine.generate(rows)] == [c.text for c in uncached.generate(rows)]
    assert engine.loop.batch.kv.blocks.prefix_hits == 3 * 5  # the three that followed took the first one's blocks
    engine.close()


def test_rows_of_other_tasks_do_not_wait_for_each_other(llama):
    folder, uncached = llama
    engine = engine_for(folder)
    rows = [GenerateRow(task, PREFIX + "same", PARAMS) for task in ("task-0", "task-1", "task-2")]
    assert [c.text for c in engine.generate(rows)] == [c.text for c in uncached.generate(rows)]
    assert engine.loop.batch.kv.blocks.prefix_hits == 0 and not engine.loop.batch.prefilling
    engine.close()


def test_rows_that_followed_a_shared_prefix_prefill_together(llama, monkeypatch):
    """Once the first row's blocks are cached, the rows behind it have a few tokens each left: one forward for all."""
    from server.engine.paged_kv import PagedKV

    folder, uncached = llama
    engine = engine_for(folder, prefill_chunk=64)
    sizes = []
    real = PagedKV.prefill

    def counting(self, rows, *args, **kwargs):
        sizes.append(len(rows))
        return real(self, rows, *args, **kwargs)

    monkeypatch.setattr(PagedKV, "prefill", counting)
    rows = [GenerateRow("task-0", PREFIX + suffix, PARAMS) for suffix in ("one", "two", "three", "four", "five")]
    assert [c.text for c in engine.generate(rows)] == [c.text for c in uncached.generate(rows)]
    assert sizes[:3] == [1, 1, 4]  # the first row (its prompt in two chunks of up to 64), then the other four
    engine.close()
