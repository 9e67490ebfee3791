"""The training bar's ETA: the recent step rate, without compilation, evals or saves."""

from dsjax.progress import StepClock


def test_eta_comes_from_recent_steps_and_leaves_out_compile_and_evals():
    now = [0.0]
    clock = StepClock(window=4, clock=lambda: now[0])
    assert clock.eta(100) == "-:--:--"  # nothing timed yet
    now[0] = 30.0
    clock.step_done()  # step 1 carries compilation: not timed
    assert clock.eta(99) == "-:--:--"
    for _ in range(3):
        now[0] += 0.5
        clock.step_done()
    assert clock.seconds_per_step() == 0.5 and clock.eta(100) == "0:00:50"
    now[0] += 60.0  # an eval
    clock.restart()
    now[0] += 0.5
    clock.step_done()
    assert clock.seconds_per_step() == 0.5  # the eval's minute is not a step
    for _ in range(4):  # the window forgets older steps: the rate follows the recent ones
        now[0] += 2.0
        clock.step_done()
    assert clock.seconds_per_step() == 2.0 and clock.eta(1800) == "1:00:00"
    assert clock.eta(0) == "0:00:00"
