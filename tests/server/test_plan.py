"""The serving loop's policy without a model: admission within rows and cache positions (in order, beams whole),
turn-taking of calls and /score work, and the share of the loop a training step gets."""

from server.engine.plan import GATHER_MAX_S, LoopView, Policy, RowCost

ROW = RowCost(blocks=2)


def test_admission_takes_waiting_rows_in_order_while_rows_allow():
    policy = Policy(max_rows=4)
    assert policy.plan(LoopView(0, [ROW] * 6)).admit == 4
    assert policy.plan(LoopView(3, [ROW] * 6)).admit == 1
    assert policy.plan(LoopView(4, [ROW] * 6)).admit == 0


def test_admission_keeps_a_spare_block_per_row_and_does_not_overtake():
    policy = Policy(max_rows=16)
    big, small = RowCost(blocks=5), RowCost(blocks=1)
    # 1 running row, 8 free blocks: `big` needs 5 + a spare for each of the 2 rows = 7 ≤ 8; then `small` 6 + 1 + 3 > 8
    assert policy.admissible(1, [big, small], free_blocks=8) == 1
    assert policy.admissible(1, [RowCost(blocks=7), small], free_blocks=8) == 0  # it waits, and `small` behind it
    assert policy.admissible(1, [small] * 4, free_blocks=8) == 3  # the 4th: 4 blocks + 5 spares > 8


def test_an_empty_batch_always_takes_the_first_row_even_beyond_the_pool():
    policy = Policy(max_rows=2)
    assert policy.admissible(0, [RowCost(blocks=50), ROW], free_blocks=10) == 1
    assert policy.admissible(0, [RowCost(blocks=1, rows=3)], free_blocks=10) == 1  # wider than the batch: alone


def test_a_beam_search_joins_with_all_its_beams_or_waits():
    policy = Policy(max_rows=4)
    beams = RowCost(blocks=6, rows=3)
    assert policy.admissible(2, [beams], free_blocks=100) == 0
    assert policy.admissible(1, [beams, ROW], free_blocks=100) == 1
    assert policy.admissible(1, [beams], free_blocks=9) == 0  # 6 blocks + 4 spares > 9
    assert policy.plan(LoopView(2, [])).decode
    assert not policy.plan(LoopView(0, [])).decode


def test_calls_and_score_chunks_take_turns():
    policy = Policy(max_rows=4)
    others = [policy.plan(LoopView(1, [], calls=5, score_chunks=1)).other for _ in range(4)]
    assert sorted(others[:2]) == ["call", "score"] and others[2:] == others[:2]
    assert policy.plan(LoopView(1, [], calls=1)).other == "call"
    assert policy.plan(LoopView(1, [], score_chunks=1)).other == "score"


def test_an_idle_loop_runs_a_training_step_after_a_grace_period():
    policy = Policy(max_rows=4, background_grace_s=0.02)
    assert policy.plan(LoopView(1, [], now=10.0)).other is None  # serving, nothing else to do
    assert policy.plan(LoopView(0, [], background=1, now=10.01)).other is None  # idle, within the grace
    assert policy.plan(LoopView(0, [], background=1, now=10.03)).other == "background"


def test_training_gets_its_share_of_a_busy_loop():
    policy = Policy(max_rows=4, background_share=0.2)
    busy = dict(running=1, waiting=[], background=1)
    policy.background_ran(started=0.0, ended=1.0)  # a 1 s step: generation gets 4 s before the next
    assert policy.plan(LoopView(**busy, now=4.9)).other is None
    assert policy.background_wait(LoopView(**busy, now=4.0)) == 1.0
    assert policy.plan(LoopView(**busy, now=5.0)).other == "background"
    assert policy.plan(LoopView(**busy, calls=1, now=6.0)).other == "call"  # waiting calls come first


def _loaded_policy(prefill_s: float = 0.04, **options) -> Policy:
    policy = Policy(max_rows=8, **options)
    policy.prefill_ran(1.0, 1)  # the first prefill, cold: not timed
    policy.prefill_ran(prefill_s, 1)
    return policy


def test_under_load_a_joinable_row_waits_up_to_one_prefill_for_others():
    policy = _loaded_policy()
    assert policy.prefill_s == 0.04
    assert policy.plan(LoopView(5, [ROW], waited=0.01)).admit == 0  # 5 of 8 rows running: it waits
    assert policy.plan(LoopView(5, [ROW, ROW], waited=0.03)).admit == 0
    assert policy.plan(LoopView(5, [ROW, ROW], waited=0.04)).admit == 2  # one prefill's time: they join together
    assert policy.plan(LoopView(5, [ROW], waited=0.01)).decode  # the running rows go on decoding meanwhile


def test_rows_join_at_once_when_waiting_gathers_nothing():
    policy = _loaded_policy()
    assert policy.plan(LoopView(3, [ROW], waited=0.0)).admit == 1  # lightly loaded: a short request is not delayed
    assert policy.plan(LoopView(5, [ROW] * 3, waited=0.0)).admit == 3  # they fill the batch
    assert policy.plan(LoopView(6, [ROW] * 3, waited=0.0)).admit == 2  # one cannot join anyway
    assert policy.plan(LoopView(5, [RowCost(1, 3)], waited=0.0)).admit == 1  # a beam search filling the batch
    assert _loaded_policy(gather_joins=False).plan(LoopView(5, [ROW], waited=0.0)).admit == 1


def test_the_wait_is_bounded_and_starts_after_a_measured_prefill():
    assert Policy(max_rows=8).plan(LoopView(5, [ROW], waited=0.0)).admit == 1  # nothing measured yet
    slow = _loaded_policy(prefill_s=5.0)
    assert slow.plan(LoopView(5, [ROW], waited=0.05)).admit == 0
    assert slow.plan(LoopView(5, [ROW], waited=GATHER_MAX_S)).admit == 1
