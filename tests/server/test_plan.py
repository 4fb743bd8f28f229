"""The serving loop's policy without a model: admission within rows and cache positions (in order, beams whole),
turn-taking of calls and /score work, and the share of the loop a training step gets."""

from server.engine.plan import LoopView, Policy, RowCost, batch_cost

ROW = RowCost(encoder=10, decoder=20)


def test_admission_takes_waiting_rows_in_order_while_rows_and_positions_allow():
    policy = Policy(max_rows=4, max_tokens=10_000)
    assert policy.plan(LoopView([], [ROW] * 6)).admit == 4
    assert policy.plan(LoopView([ROW] * 3, [ROW] * 6)).admit == 1
    assert policy.plan(LoopView([ROW] * 4, [ROW] * 6)).admit == 0


def test_a_row_that_does_not_fit_the_positions_waits_and_so_do_those_behind_it():
    policy = Policy(max_rows=16, max_tokens=100)
    long, short = RowCost(10, 60), RowCost(1, 2)
    # running 1 × (10 + 20) = 30; with `long` 2 × (10 + 60) = 140 > 100: it waits, and `short` behind it too
    assert policy.admissible([ROW], [long, short]) == 0
    assert policy.admissible([ROW], [short, long]) == 1
    assert batch_cost([ROW, long]) == 140


def test_an_empty_batch_always_takes_the_first_row_even_if_it_is_over_budget():
    policy = Policy(max_rows=2, max_tokens=10)
    assert policy.admissible([], [RowCost(50, 50), ROW]) == 1
    assert policy.admissible([], [RowCost(1, 1, rows=3)]) == 1  # a beam search wider than the batch runs alone


def test_a_beam_search_joins_with_all_its_beams_or_waits():
    policy = Policy(max_rows=4, max_tokens=10_000)
    beams = RowCost(10, 20, rows=3)
    assert policy.admissible([ROW, ROW], [beams]) == 0
    assert policy.admissible([ROW], [beams, ROW]) == 1
    assert policy.plan(LoopView([ROW] * 2, [])).decode
    assert not policy.plan(LoopView([], [])).decode


def test_calls_and_score_chunks_take_turns():
    policy = Policy(max_rows=4, max_tokens=100)
    others = [policy.plan(LoopView([ROW], [], calls=5, score_chunks=1)).other for _ in range(4)]
    assert sorted(others[:2]) == ["call", "score"] and others[2:] == others[:2]
    assert policy.plan(LoopView([ROW], [], calls=1)).other == "call"
    assert policy.plan(LoopView([ROW], [], score_chunks=1)).other == "score"


def test_an_idle_loop_runs_a_training_step_after_a_grace_period():
    policy = Policy(max_rows=4, max_tokens=100, background_grace_s=0.02)
    assert policy.plan(LoopView([ROW], [], now=10.0)).other is None  # serving, nothing else to do
    assert policy.plan(LoopView([], [], background=1, now=10.01)).other is None  # idle, within the grace
    assert policy.plan(LoopView([], [], background=1, now=10.03)).other == "background"


def test_training_gets_its_share_of_a_busy_loop():
    policy = Policy(max_rows=4, max_tokens=100, background_share=0.2)
    busy = dict(running=[ROW], waiting=[], background=1)
    policy.background_ran(started=0.0, ended=1.0)  # a 1 s step: generation gets 4 s before the next
    assert policy.plan(LoopView(**busy, now=4.9)).other is None
    assert policy.background_wait(LoopView(**busy, now=4.0)) == 1.0
    assert policy.plan(LoopView(**busy, now=5.0)).other == "background"
    assert policy.plan(LoopView(**busy, calls=1, now=6.0)).other == "call"  # waiting calls come first
