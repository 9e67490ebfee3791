"""Graceful stop: one Ctrl-C that arrives twice (terminal + `uv run` forwarding) is one request."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsjax.train import signals
from dsjax.train.signals import REPEAT_WINDOW_SEC, GracefulStop

DSJAX = str(Path(sys.executable).with_name("dsjax"))


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


def test_ctrl_c_before_training_raises_once_and_is_remembered_if_swallowed():
    previous = signals.install_interrupt_handler()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy of the same press: ignored
        # as if that KeyboardInterrupt had been swallowed (JAX's gc callback): the loop still stops
        with pytest.raises(KeyboardInterrupt):
            GracefulStop().__enter__()
    finally:
        signals.restore_interrupt_handler(previous)
    assert signal.getsignal(signal.SIGINT) is previous
    with GracefulStop():  # the record goes with the handler: a later run in this process is not stopped
        pass


def test_ctrl_c_while_importing_jax_is_raised_after_the_import():
    previous = signals.install_interrupt_handler()
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                reached = True  # not raised inside the block
        assert reached
    finally:
        signals.restore_interrupt_handler(previous)


@pytest.mark.parametrize("after_sec", [0.8, 1.6, 3.0])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, tinystories_dir, after_sec):
    """SIGINT to the whole process group (twice, as `uv run` forwards it) while `dsjax run` starts Python,
    imports JAX or prepares its data: one line and exit 130, never a traceback or an abort."""
    proc = subprocess.Popen(
        [DSJAX, "run", "--model-size", "nano", "--max-steps", "5", "--data-dir", str(tinystories_dir),
         "--work-dir", str(tmp_path / "w"), "--checkpoint-dir", str(tmp_path / "ck"), "--output-dir", str(tmp_path / "out")],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    time.sleep(after_sec)
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "terminate called" not in err, err
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith(("dsjax: interrupted", "dsjax: received SIGINT")), err
