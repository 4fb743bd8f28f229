"""The serving loop's clock charges the time between laps to the phase that ended."""

from server.engine.loop_clock import PHASES, LoopClock


def test_each_lap_charges_the_time_since_the_last_one():
    clock = LoopClock(iter([10.0, 10.5, 12.0, 12.25, 13.0]).__next__)  # started at 10.0
    clock.lap("idle")
    clock.lap("decode")
    clock.lap("answer")
    clock.lap("decode")
    assert clock.seconds == {**dict.fromkeys(PHASES, 0.0), "idle": 0.5, "decode": 1.5 + 0.75, "answer": 0.25}
