"""When a single-task batch merges its adapter into the weights (AdapterSlots.merge_pays): on a CPU a merge writes and
repacks every wrapped weight, so tasks that take turns in short requests run the shared mode instead of paying a
merge each; a task busy enough merges, and its merge is kept."""

from __future__ import annotations

from server.engine import GenerateRow, SamplingParams
from tests.factories import engine_for, save_bundle


def test_merging_pays_after_the_rows_and_tokens_a_merge_costs(tmp_path):
    save_bundle(tmp_path, "t5")
    engine = engine_for(tmp_path)
    slots = engine.slots
    weights = [layer.base.weight.numel() for layer in slots.layers.values()]
    assert slots.merge_after_row_steps == sum(weights) // len(weights) // 1024  # on a CPU
    slots.merge_after_row_steps = 10
    assert not slots.merge_pays("a", 4)
    slots.ran_unmerged("a", 8)
    assert slots.merge_pays("a", 4) and not slots.merge_pays("b", 4)  # what a ran unmerged counts for a alone
    adapter = engine.store.adapter("task-0")
    slots.use_merged(adapter, "a")
    assert slots.merge_pays("a", 0)  # its buffers hold it: no work
    assert not slots.merge_pays("b", 4)  # the counts start again after a merge
    slots.prepack(16)
    assert not slots.merge_pays("a", 0)  # prepacking made the layers forget their merges
    engine.close()


def test_short_requests_share_the_adapter_and_a_long_one_merges_with_the_same_text(tmp_path):
    save_bundle(tmp_path, "t5")
    merging, shared = engine_for(tmp_path), engine_for(tmp_path, merge_single_task=False)
    merging.slots.merge_after_row_steps = 12

    def ask(engine, task: str, tokens: int) -> str:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        return engine.generate([GenerateRow(task, "hello there", params)])[0].text

    for task in ("task-0", "task-1", "task-0"):  # 4 tokens each, tasks taking turns: never worth a merge
        assert ask(merging, task, 4) == ask(shared, task, 4)
        assert merging.slots.merged_key is None
    assert ask(merging, "task-1", 16) == ask(shared, "task-1", 16)  # 4 + 16 rows x tokens reach 12
    merged = merging.slots.merged_key
    assert merged is not None and merged.task == "task-1"
    assert ask(merging, "task-0", 4) == ask(shared, "task-0", 4)
    assert merging.slots.merged_key == merged  # a short turn of another task keeps the merge
    merging.close()
    shared.close()
