"""What decoding steps keep of their gathered keys (server/engine/kept_gathers.py): a kept self-attention copy grown
by each step's new positions equals the group gathered afresh; a new row, a skipped step, a narrow group or a copy too
large gathers again; what is in use is never dropped for a new copy; end to end, rows decoded over kept copies equal
rows decoded over fresh gathers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adapter_store import AdapterCache, AdapterStore
from server.engine import Engine, GenerateRow, SamplingParams, load_model
from server.engine.block_manager import BlockManager
from server.engine.kept_gathers import CrossGathers, SelfGathers
from server.engine.kv_pool import KVPool
from server.engine.paged_kv import PagedKV
from tests.factories import save_bundle

BLOCK, HEADS, DIM = 4, 2, 8


def _pool() -> KVPool:
    return KVPool(1, HEADS, DIM, 16, BLOCK, torch.float32, torch.device("cpu"))


class _Rows:
    """Rows of one group growing a position per step in a pool: their slots, and the group as a step names it."""

    def __init__(self, pool: KVPool, lengths: list[int], serials: tuple[int, ...]):
        self.pool, self.lengths, self.serials = pool, list(lengths), serials
        self.slots = [[BLOCK * (1 + 3 * i) + p for p in range(BLOCK * 3)] for i in range(len(lengths))]
        for row, length in enumerate(lengths):
            self._write(row, range(length))

    def _write(self, row: int, positions) -> None:
        slots = torch.tensor([self.slots[row][p] for p in positions])
        self.pool.keys[0][:, slots] = torch.randn(HEADS, len(slots), DIM)
        self.pool.values[0][:, slots] = torch.randn(HEADS, len(slots), DIM)

    def step(self) -> SimpleNamespace:
        """Each row writes its next position; the group of this step."""
        for row, length in enumerate(self.lengths):
            self._write(row, [length])
            self.lengths[row] += 1
        width = max(self.lengths)
        distance = torch.tensor(self.lengths)[:, None] - 1 - torch.arange(width)[None, :]
        placed = list(zip(self.slots, self.lengths, strict=True))
        slots = torch.tensor([[s[p] if p < n else 0 for p in range(width)] for s, n in placed])  # 0: scratch
        fresh = torch.tensor([s[n - 1] for s, n in placed])
        return SimpleNamespace(serials=self.serials, lengths=tuple(self.lengths), fresh=fresh, width=width,
                               distance=distance, slots=slots)

    def gather(self, group, calls: list):
        def gather():
            calls.append(1)
            flat = group.slots.view(-1)
            shape = (HEADS, len(self.lengths), group.width, DIM)
            return (self.pool.keys[0].index_select(1, flat).view(shape),
                    self.pool.values[0].index_select(1, flat).view(shape))
        return gather


def _real(tensor: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    return tensor * (distance >= 0)[None, :, :, None]  # padding positions are masked: not compared


def test_a_kept_copy_grown_step_by_step_equals_the_group_gathered_afresh():
    pool = _pool()
    kept, calls = SelfGathers(pool, min_width=0), []
    rows = _Rows(pool, [3, 5], serials=(7, 8))
    for _ in range(6):
        group = rows.step()
        keys, values = kept.get(0, group, rows.gather(group, calls))
        fresh_keys, fresh_values = rows.gather(group, [])()
        assert torch.equal(_real(keys, group.distance), _real(fresh_keys, group.distance))
        assert torch.equal(_real(values, group.distance), _real(fresh_values, group.distance))
    assert len(calls) == 1  # gathered once, then grown


def test_narrow_groups_gather_every_step_until_they_reach_the_minimum_width():
    """Below min_width a gather is cheaper than writing into a kept copy: nothing is kept; from there on it is."""
    pool = _pool()
    kept, calls = SelfGathers(pool, min_width=6), []
    rows = _Rows(pool, [3, 3], serials=(7, 8))
    for _ in range(6):  # widths 4 .. 9: gathered at 4 and 5, then once at 6 and grown
        group = rows.step()
        keys, _ = kept.get(0, group, rows.gather(group, calls))
        assert torch.equal(_real(keys, group.distance), _real(rows.gather(group, [])()[0], group.distance))
    assert len(calls) == 3


def test_new_rows_and_skipped_steps_gather_again():
    pool = _pool()
    kept, calls = SelfGathers(pool, min_width=0), []
    rows = _Rows(pool, [3, 5], serials=(7, 8))
    group = rows.step()
    kept.get(0, group, rows.gather(group, calls))
    rows.step()  # a step that did not look (a static or Arrow step): the copy is one position behind
    group = rows.step()
    keys, _ = kept.get(0, group, rows.gather(group, calls))
    assert torch.equal(_real(keys, group.distance), _real(rows.gather(group, [])()[0], group.distance))
    rows.serials = (7, 9)  # a beam followed its parent: other positions under the same place
    group = rows.step()
    keys, _ = kept.get(0, group, rows.gather(group, calls))
    assert len(calls) == 3
    assert torch.equal(_real(keys, group.distance), _real(rows.gather(group, [])()[0], group.distance))


def test_what_is_in_use_is_never_dropped_for_a_new_copy():
    pool, calls = _pool(), []
    first, second = _Rows(pool, [2, 2], serials=(1, 2)), _Rows(pool, [2, 2], serials=(3, 4))
    group = first.step()
    one_copy = 2 * HEADS * 2 * (group.width + 32) * DIM * 4
    kept = SelfGathers(pool, max_bytes=one_copy + one_copy // 2, min_width=0)  # room for one copy
    for _ in range(3):  # both groups decode every step: the second finds no room and gathers every time
        kept.get(0, group, first.gather(group, calls))
        other = second.step()
        kept.get(0, other, second.gather(other, calls))
        group = first.step()
    assert len(calls) == 1 + 3


def test_cross_gathers_are_kept_per_layer_and_group_until_cleared_and_within_their_budget():
    calls = []

    def gather(elements: int = 4):
        calls.append(elements)
        return torch.zeros(elements), torch.zeros(elements)  # 2 x 4 bytes per element

    group_a, group_b = SimpleNamespace(key=("a",)), SimpleNamespace(key=("b",))
    kept = CrossGathers(max_bytes=100)
    first = kept.get(0, group_a, gather)
    assert kept.get(0, group_a, gather) is first and len(calls) == 1
    kept.get(1, group_a, gather)
    kept.get(0, group_b, gather)
    assert len(calls) == 3  # one per layer and group
    kept.clear()
    kept.get(0, group_a, gather)
    assert len(calls) == 4
    kept.get(2, group_a, lambda: gather(16))  # 128 bytes: over the budget, never kept
    kept.get(2, group_a, lambda: gather(16))
    assert len(calls) == 6
    kept.get(0, group_a, gather)
    assert len(calls) == 6  # what was kept is still there


def test_cross_length_groups_are_built_once_while_the_rows_stay():
    """Cross-attention groups depend on the rows' encoder tables and lengths only: the same rows reuse them; another
    table or length builds them again."""
    kept, built = CrossGathers(), []

    def build():
        built.append(1)
        return len(built)

    tables, lengths = [[1, 2], [3]], [7, 3]
    assert kept.groups(tables, lengths, build) == kept.groups([[1, 2], [3]], [7, 3], build) == 1
    assert kept.groups([[1, 2], [4]], lengths, build) == 2
    assert kept.groups([[1, 2], [4]], [7, 2], build) == 3
    assert len(built) == 3


@pytest.fixture(scope="module", params=["t5", "llama"])
def long_rows_engines(request, tmp_path_factory):
    """Two engines on one bundle: self-attention gathers kept from 8 positions on, and never kept."""
    folder = tmp_path_factory.mktemp(request.param)
    save_bundle(folder, request.param, sharp=False)  # log-probabilities far from 0: they show any change
    engines = [Engine(load_model(folder / "model", device="cpu"), AdapterStore.open(folder / "inventory"),
                      AdapterCache(10**8), kv_block_size=4) for _ in range(2)]
    engines[0].loop.batch.kv.self_gathers.min_width = 8
    engines[1].loop.batch.kv.self_gathers.min_width = 10**9
    yield engines
    for engine in engines:
        engine.close()


def test_rows_decoded_over_kept_gathers_equal_rows_decoded_over_fresh_ones(long_rows_engines):
    """End to end: rows of other tasks, in groups of equal lengths that change as rows leave (their copies grow across
    block boundaries and past MARGIN, then are gathered anew), get the same tokens and log-probabilities either
    way."""
    kept, fresh = long_rows_engines

    def run(engine):
        texts = ["input a", "input b", "a longer input c", "a longer input d"]  # two pairs of equal lengths
        jobs = [engine.submit_generate([GenerateRow(f"task-{i % 3}", text, SamplingParams(
            max_new_tokens=48 - 6 * i, ignore_eos=True, logprobs=0))]) for i, text in enumerate(texts)]
        return [[(c.text, [round(lp.logprob, 4) for lp in c.logprobs]) for c in job.future.result(timeout=120)]
                for job in jobs]

    grown = []
    original = kept.loop.batch.kv.self_gathers._new_positions
    kept.loop.batch.kv.self_gathers._new_positions = lambda *a: (grown.append(1), original(*a))[1]
    assert run(kept) == run(fresh)
    assert len(grown) > 40  # the kept path ran: copies grown step by step


def test_self_attention_copies_are_kept_on_a_cpu_only():
    """On a GPU a gather is one launch and growing a copy two per tensor: there every step gathers (the meta device
    stands in for a GPU)."""
    for device, keeps in (("cpu", True), ("meta", False)):
        pool = KVPool(1, HEADS, DIM, 16, BLOCK, torch.float32, torch.device(device))
        kv = PagedKV(None, False, torch.device(device), pool, BlockManager(16, BLOCK), pad_id=0)
        assert (kv.self_gathers is not None) is keeps
