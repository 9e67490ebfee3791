"""Graceful stop: one Ctrl-C that arrives twice (terminal + `uv run` forwarding) is one request."""

import os
import signal

import pytest

from dsjax.train.signals import REPEAT_WINDOW_SEC, GracefulStop


def test_a_repeated_sigint_inside_the_window_is_the_same_press_and_a_later_one_stops_at_once():
    now = [100.0]
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(clock=lambda: now[0]) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        now[0] += 0.01  # uv's forwarded copy, milliseconds later
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's SIGTERM meanwhile changes nothing
        assert stop.name == "SIGINT"
        now[0] += REPEAT_WINDOW_SEC
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a real second press
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back


def test_sigterm_first_then_sigint_stops_at_once_after_the_window():
    now = [0.0]
    with GracefulStop(clock=lambda: now[0]) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"
        now[0] += REPEAT_WINDOW_SEC
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
