"""The static-shaped decoding step (server/engine/static_step.py): rows padded to a bucket, block tables padded to a
power of two, every row reading whole blocks masked past its length. Its greedy and seeded output equals the paged
step's for T5 (ReLU and gated) and Llama GQA, in mixed-task batches whose rows join and leave; a batch it cannot take
(Arrow rows) still goes the paged way, beams take it; its padding reads only the scratch block."""

import pytest
import torch

from adapter_store import AdapterCache, AdapterStore
from server.engine import Engine, GenerateRow, SamplingParams, load_model
from server.engine.kv_pool import SCRATCH_BLOCK, KVPool
from server.engine.paged_kv import RowKV
from server.engine.static_step import block_bucket, row_bucket, static_inputs
from tests.factories import save_bundle

TEXTS = ["hello there", "abc", "a much longer input text that spans blocks", "xyz!", "mid", "q"]


def engine_for(folder, **options) -> Engine:
    return Engine(load_model(folder / "model", device="cpu"), AdapterStore.open(folder / "inventory"),
                  AdapterCache(10**8), kv_block_size=4, **options)


@pytest.fixture(scope="module", params=["t5", "t5-gated", "llama"])
def engines(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_bundle(folder, request.param)
    paged, static = engine_for(folder), engine_for(folder, static_step="eager")
    yield paged, static
    paged.close()
    static.close()


def _rows(params):
    tasks = ["task-0", "task-1", "task-2", "__base__", "task-0", "__mu__"]
    return [GenerateRow(task, text, SamplingParams(**params, max_new_tokens=4 + 3 * i, ignore_eos=True))
            for i, (task, text) in enumerate(zip(tasks, TEXTS, strict=True))]  # 6 rows: a bucket of 8, rows leave


@pytest.mark.parametrize("params", [{}, {"temperature": 0.9, "seed": 7}])
def test_static_step_equals_paged_step(engines, params):
    paged, static = engines
    before = static.loop.batch.kv.static.steps
    expected = [c.text for c in paged.generate(_rows(params))]
    assert [c.text for c in static.generate(_rows(params))] == expected
    assert static.loop.batch.kv.static.steps > before  # the static step did run


def test_static_steps_are_counted_in_the_loop_stats(engines):
    """/readyz and /metrics read these: the mode (graphs turned off show "eager"), steps, captures."""
    paged, static = engines
    static.generate(_rows({}))
    stats = static.stats()
    assert stats.static_step == "eager" and stats.static_steps > 0 and stats.graph_captures == 0
    assert (paged.stats().static_step, paged.stats().static_steps) == (None, 0)


def test_single_task_and_base_batches_equal_paged(engines):
    paged, static = engines
    for task in ("task-1", "__base__"):
        rows = [GenerateRow(task, text, SamplingParams(max_new_tokens=9)) for text in TEXTS[:3]]
        assert [c.text for c in static.generate(rows)] == [c.text for c in paged.generate(rows)]


def test_single_task_batches_unmerged_keep_one_layout_for_every_task(tmp_path):
    """Without merged weights a single-task batch runs shared mode; the static step copies each task's adapter into
    buffers that stay put, so one captured graph per bucket serves every task (the layout a graph is keyed by is
    the same), and the text equals the paged step's."""
    save_bundle(tmp_path, "t5")
    paged = engine_for(tmp_path, merge_single_task=False)
    static = engine_for(tmp_path, merge_single_task=False, static_step="eager")
    decode, layouts = static.loop.batch.kv.static, set()
    forward = decode.forward
    decode.forward = lambda inputs: (layouts.add(decode.layout()), forward(inputs))[1]
    for task in ("task-0", "task-1", "task-2"):
        rows = [GenerateRow(task, text, SamplingParams(max_new_tokens=6, ignore_eos=True)) for text in TEXTS[:2]]
        assert [c.text for c in static.generate(rows)] == [c.text for c in paged.generate(rows)]
    assert len(layouts) == 1 and decode.steps > 0
    paged.close()
    static.close()


def test_beams_take_the_static_step_alone_and_beside_other_rows(engines):
    """Beams are rows of the batch like any other (their caches follow their parents between steps), so a batch with
    a beam search still runs the static step — on a GPU its graphs: a beam request does not drop the whole batch to
    the eager step. The texts equal the paged step's."""
    paged, static = engines
    beams = GenerateRow("task-0", "beam me", SamplingParams(max_new_tokens=6, num_beams=3))
    for batch in ([beams], [beams, *_rows({})[:3]]):
        steps = static.loop.batch.kv.static.steps
        assert [c.text for c in static.generate(batch)] == [c.text for c in paged.generate(batch)]
        assert static.loop.batch.kv.static.steps > steps


def test_buckets():
    assert [row_bucket(n) for n in (1, 3, 5, 16, 17, 33)] == [1, 4, 8, 16, 24, 48]
    assert [block_bucket(n) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]


class _Row:
    def __init__(self, table, length, cross=(), cross_length=0):
        self.kv = RowKV(list(table), length, list(cross), cross_length)


def test_padding_rows_and_tables_point_at_scratch():
    pool = KVPool(1, 1, 2, 20, 4, torch.float32, torch.device("cpu"), zeroed=True)
    rows = [_Row([3, 4, 5], 9, [7], 3), _Row([9], 2, [8, 10], 6), _Row([11, 12], 5, [13], 1)]
    inputs = static_inputs(pool, rows, [5, 6, 7], pad_id=0, device=torch.device("cpu"), seq2seq=True)
    assert inputs.ids.shape == (4, 1) and inputs.ids[:, 0].tolist() == [5, 6, 7, 0]
    assert inputs.positions[:, 0].tolist() == [9, 2, 5, 0]
    assert inputs.slots[:, 0].tolist() == [5 * 4 + 1, 9 * 4 + 2, 12 * 4 + 1, SCRATCH_BLOCK * 4]
    assert inputs.tables.tolist() == [[3, 4, 5, 0], [9, 0, 0, 0], [11, 12, 0, 0], [0, 0, 0, 0]]
    assert inputs.lengths.tolist() == [10, 3, 6, 1]
    assert inputs.cross_tables.tolist() == [[7, 0], [8, 10], [13, 0], [0, 0]]
    assert inputs.cross_lengths.tolist() == [3, 6, 1, 1]
    assert all(torch.equal(t, torch.zeros_like(t)) for t in (*pool.keys, *pool.values))  # zeroed: finite everywhere


def test_unknown_mode_and_graphs_without_cuda_are_refused(tmp_path):
    save_bundle(tmp_path, "llama")
    with pytest.raises(ValueError, match="static step mode"):
        engine_for(tmp_path, static_step="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            engine_for(tmp_path, static_step="cuda-graphs")


def test_cuda_graphs_setting_maps_to_the_static_step():
    from server.app import _static_step
    from server.settings import Settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _static_step(Settings(), cpu) is None
    assert _static_step(Settings(), cuda) == "cuda-graphs"  # on by default with CUDA
    assert _static_step(Settings(cuda_graphs=False), cuda) is None
    assert _static_step(Settings(cuda_graphs=True), cpu) == "cuda-graphs"  # on a CPU: refused at start-up (above)
