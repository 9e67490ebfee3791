import subprocess
import sys
from pathlib import Path

import pytest

from dsjax.cli import main


# the console script installed beside this interpreter (PATH may not include the venv)
DSJAX = str(Path(sys.executable).parent / "dsjax")


def test_help_works_as_console_script_and_module():
    for cmd in ([DSJAX, "--help"], [sys.executable, "-m", "dsjax", "--help"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "run" in result.stdout and "generate" in result.stdout
    result = subprocess.run([DSJAX, "run", "--help"], capture_output=True, text=True, timeout=120)
    assert "--grad-accum" in result.stdout and "--resume" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--stages", "pretrian"], "unknown stage 'pretrian'; did you mean 'pretrain'"),
        (["run", "--stages", "all,sft"], "--stages all already holds every stage; pass it alone"),
        (["run", "--backend", "mlx", "--tp-size", "2", "--dp-size", "1"], "--backend mlx runs on one device"),
        (["run", "--stages", "pretrain", "--data-dir", "/nonexistent/x"], "data folder /nonexistent/x does not exist"),
        (["run", "--max-steps", "0", "--stages", "pretrain"], "training.max_steps: must be > 0, got 0"),
        (["run", "--seq-len", "4096"], "training.seq_len: 4096 exceeds model.max_position_embeddings=1024"),
        (["download", "--from", "/nonexistent/file.txt", "--out", "/nonexistent/out"], "no such file or folder"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_a_checkpoint_error(capsys):
    assert main(["generate", "--checkpoint", "/nonexistent/final"]) == 4
    assert "/nonexistent/final does not exist; pass a final/ folder" in capsys.readouterr().err


def test_flag_abbreviations_are_refused(capsys):
    assert main(["run", "--max-step", "10"]) == 2  # not silently taken as --max-steps
    assert "--max-step" in capsys.readouterr().err


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"num_hiden_layers": 2}}')
    assert main(["run", "--config", str(bad)]) == 2
    assert "did you mean 'num_hidden_layers'" in capsys.readouterr().err


def test_unknown_flag_is_one_line_and_exit_code_2(capsys):
    assert main(["run", "--max-steps", "3", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --bogus" in err


def test_help_lists_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "141" in out and "143" in out


def test_run_help_gives_each_sizes_intervals(capsys):
    assert main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert "steps between checkpoints (default per size: nano 100, tiny 500, small 1,000, medium 2,000)" in out


def test_info_prints_counts(capsys):
    assert main(["info", "--model-size", "tiny"]) == 0
    assert "21,053,280" in capsys.readouterr().out


def test_eval_names_a_checkpoint_by_its_run_or_its_own_name(tmp_path):
    from dsjax.train.runs import run_name_of

    assert run_name_of(tmp_path / "checkpoints/nano-sft/final") == "nano-sft"
    assert run_name_of(tmp_path / "imports/from-hf") == "from-hf"  # `dsjax import --out imports/from-hf`


def test_ctrl_c_while_scoring_the_stages_says_how_to_get_the_table(tmp_path, monkeypatch):
    import argparse

    import dsjax.posttrain.evaluate as evaluate
    from dsjax.cli import compare_stages
    from dsjax.config import config_from_dict
    from dsjax.stages import plan_stages
    from dsjax.train.signals import StopRequested

    config = config_from_dict({"training": {"checkpoint_dir": str(tmp_path / "ck"), "output_dir": str(tmp_path / "out")}})
    for run in ("nano", "nano-sft"):
        (tmp_path / "ck" / run / "final").mkdir(parents=True)
    plans = plan_stages(["sft"], config, "nano", resume=True, overwrite=False)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "compare", interrupted)
    with pytest.raises(StopRequested) as stop:
        compare_stages(plans, config, argparse.Namespace(start_from=None, model_size="nano"))
    assert stop.value.exit_code == 130
    assert "final/ folders are saved" in str(stop.value) and "dsjax eval --checkpoint" in str(stop.value)
