"""`dsjax bench`: the FLOP formula against a hand count, and the --json fields through the CLI."""

import dataclasses
import gzip
import json
import os
from pathlib import Path

from dsjax import bench, trace_summary
from dsjax.cli import main
from dsjax.config import load_config


def test_flops_formula_matches_a_hand_count_for_nano():
    c = load_config("nano").model
    # per layer: q_proj 128*4*48, kv_a 128*(64+16), kv_b 64*4*(32+32), o_proj 4*32*128
    attention = 24_576 + 10_240 + 16_384 + 16_384
    dense_layer = attention + 3 * 128 * 384
    # router 128*8, one shared expert 3*128*96, top-2 of the routed experts 2*3*128*96
    moe_layer = attention + 1_024 + 36_864 + 73_728
    head = 128 * 4096
    assert bench.matmul_params_per_token(c) == dense_layer + 3 * moe_layer + head == 1_276_928
    # 4 attention layers x 6 x heads 4 x (qk 48 + v 32) x (256 + 1) / 2 keys seen on average
    assert bench.attention_flops_per_token(c, 256) == 4 * 6 * 4 * 80 * 128.5
    assert bench.train_flops_per_token(c, 256) == 6 * 1_276_928 + 986_880
    # with one MTP module (the preset has none): eh_proj, its MoE block and the shared output head again
    with_mtp = dataclasses.replace(c, num_nextn_predict_layers=1)
    mtp = 2 * 128 * 128 + moe_layer + head
    assert bench.matmul_params_per_token(with_mtp) == 1_276_928 + mtp == 2_013_184
    assert bench.attention_flops_per_token(with_mtp, 256) == 5 * 6 * 4 * 80 * 128.5


def test_peak_table_and_override():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert bench.peak_tflops("cpu") is None
    assert bench.peak_tflops("cpu", 1.5) == 1.5


def test_bench_json_rows(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    code = main([
        "bench", "--model-size", "nano", "--batch-size", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1",
        "--peak-tflops", "1.0", "--gpus", "1", "--json", "--results", str(results), "--profile", str(tmp_path / "prof"),
    ])
    assert code == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    for key in (
        "device", "jax", "git_commit", "compile_sec", "step_ms_median", "step_ms_p10", "step_ms_p90",
        "steps_per_sec", "tokens_per_sec", "flops_per_token", "mfu", "peak_memory_gib", "compiled_memory_gib",
        "moe_impl", "attention_impl", "seq_len", "batch_size", "accumulation", "back_to_back_ms_per_step",
    ):
        assert key in row, key
    assert row["batch_size"] == 2 and row["seq_len"] == 32
    assert row["tokens_per_sec"] > 0 and 0 < row["lower_sec"] < row["compile_sec"]
    assert row["back_to_back_ms_per_step"] > 0
    assert row["launches_per_step"] > 10  # the step's thunks on XLA:CPU, from its compiled program
    assert row["flops_per_token"] == bench.train_flops_per_token(load_config("nano").model, 32)
    expected_mfu = row["flops_per_token"] * 64 / (row["step_ms_median"] / 1e3) / 1e12
    assert abs(row["mfu"] - expected_mfu) <= 1e-3 * expected_mfu + 1e-4
    assert [json.loads(line)["case"] for line in results.read_text().splitlines()] == [row["case"]]
    # --profile: 3 more steps traced; XLA:CPU's per-op events (conftest sets the flag the CLI sets)
    profile = row["profile"]
    assert Path(profile["trace"]).is_file() and Path(profile["trace"]).is_relative_to(tmp_path / "prof")
    assert profile["wall_ms_per_step"] > 0 and profile["lines"][0]["events_per_step"] > 10
    assert sum(line["busy_ms_per_step"] for line in profile["lines"]) > 0
    assert any("dot_general" in op["source"] for op in profile["top_ops"]), profile["top_ops"]
    assert any(r["where"].startswith("model/") for r in profile["by_source"]), profile["by_source"]  # the model's lines
    assert f"profile of {row['case']}" in err


def test_trace_summary_of_a_gpu_like_trace(tmp_path):
    """Busy time merges nested events; ops come from the device line with the most events, named by hlo_op."""
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "tid": 3, "name": "thread_name", "args": {"name": "python"}},
    ]
    kernels = [  # two steps of three kernels (10, 10 and 3 us), 15 us apart
        {"ph": "X", "pid": 1, "tid": 7, "ts": 100 * s + 15 * k, "dur": [10, 10, 3][k], "name": f"loop_fusion_kernel_{k}",
         "args": {"hlo_op": ["fusion.1", "fusion.2", "dot.3"][k]}}
        for s in range(2) for k in range(3)
    ]
    modules = [{"ph": "X", "pid": 1, "tid": 8, "ts": 100 * s, "dur": 40, "name": "jit_train_step(1)"} for s in range(2)]
    host = [  # a dispatch event with one nested event: 30 us busy, not 50
        {"ph": "X", "pid": 2, "tid": 3, "ts": 0, "dur": 30, "name": "launch"},
        {"ph": "X", "pid": 2, "tid": 3, "ts": 5, "dur": 20, "name": "launch_inner"},
        {"ph": "X", "pid": 2, "tid": 3, "ts": 1, "dur": 500, "name": "PjitFunction(train_step)"},  # runtime, not an op
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + kernels + modules + host}, f)
    summary = trace_summary.summarize(path, steps=2, wall_sec=400e-6, sources={"dot.3": "bwd btd,dv->btv dot_general"},
                                      locations={"fusion.1": "model/mla.py:58 attention", "fusion.2": "model/mla.py:58 attention"},
                                      floors={"model/mla.py:58 attention": 5e-6})
    lines = {r["line"]: r for r in summary["lines"]}
    assert lines["/device:GPU:0 / Stream #13(Compute)"] == {
        "line": "/device:GPU:0 / Stream #13(Compute)", "events_per_step": 3.0, "busy_ms_per_step": 0.023,
    }
    assert (summary["short_ops_per_step"], summary["short_ops_ms_per_step"]) == (1.0, 0.003)  # under 5 us
    assert lines["/host:CPU / python"]["busy_ms_per_step"] == 0.015
    assert summary["wall_ms_per_step"] == 0.2 and summary["ops_line"] == "/device:GPU:0 / Stream #13(Compute)"
    assert [(r["op"], r["calls_per_step"]) for r in summary["top_ops"]] == [("fusion.1", 1.0), ("fusion.2", 1.0), ("dot.3", 1.0)]
    assert summary["top_ops"][2]["source"] == "bwd btd,dv->btv dot_general"
    assert summary["top_ops"][0]["where"] == "model/mla.py:58 attention" and summary["top_ops"][2]["where"] == ""
    # every kernel summed per Python line; an op the program does not place goes under "?"
    assert summary["by_source"] == [  # with the line's floor where one is given (hlo_launches' estimate)
        {"where": "model/mla.py:58 attention", "ms_per_step": 0.02, "kernels_per_step": 2.0, "floor_ms_per_step": 0.005},
        {"where": "?", "ms_per_step": 0.003, "kernels_per_step": 1.0},
    ]
    text = trace_summary.format_summary("case", summary)
    assert "time per Python line" in text and "4.0x   model/mla.py:58 attention" in text
    assert "Stream #13(Compute)" in trace_summary.format_summary("case", summary)
    # XLA:CPU's while/call events enclose their bodies' ops: not ops themselves
    assert not trace_summary.is_op({"name": "while.95"}) and trace_summary.is_op({"name": "ynn_fusion.2"})


def test_device_tables_match_the_longest_name_first():
    assert bench.memory_tbps("NVIDIA H200") == 4.8 and bench.memory_tbps("NVIDIA GH200 480GB") == 4.0
    assert bench.memory_tbps("NVIDIA H100 80GB HBM3") == 3.35 and bench.memory_tbps("cpu") is None
    assert bench.peak_tflops("NVIDIA H200") == 989.0


def test_cpu_op_events_flag_is_added_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    trace_summary.enable_cpu_op_events()
    trace_summary.enable_cpu_op_events()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --xla_cpu_enable_xprof_traceme=true"


def test_bench_rejects_bad_lists(capsys):
    assert main(["bench", "--moe", "fast"]) == 2
    assert "--moe: unknown value 'fast'" in capsys.readouterr().err
    assert main(["bench", "--remat", "some"]) == 2
    assert "--remat: unknown value 'some' (none, full, save_dots)" in capsys.readouterr().err
    assert main(["bench", "--model-size", "huge"]) == 2
    assert main(["bench", "--seq-len", "abc"]) == 2
    assert main(["bench", "--backend", "mlx", "--moe", "dense"]) == 2
    assert "pick JAX compute paths" in capsys.readouterr().err
    assert main(["bench", "--backend", "mlx", "--accumulation", "fold"]) == 2
    assert "--accumulation pick JAX compute paths" in capsys.readouterr().err
    assert main(["bench", "--accumulation", "together"]) == 2
    assert "--accumulation: unknown value 'together' (auto, scan, fold)" in capsys.readouterr().err
    assert main(["bench", "--peak-tflops", "-1"]) == 2
    assert "--peak-tflops must be > 0" in capsys.readouterr().err
    assert main(["bench", "--json", "--results", "README.md"]) == 2
    assert "give a .jsonl file" in capsys.readouterr().err
    assert main(["bench", "--results", "rows.jsonl"]) == 2
    assert "add --json" in capsys.readouterr().err
    assert main(["bench", "--profile", __file__]) == 2
    assert "is a file; give a folder for the traces" in capsys.readouterr().err


def test_a_path_that_fell_back_is_named_as_what_ran(tmp_path, capsys):
    """--attention cudnn on CPU runs the xla reference: the row says so, not cudnn."""
    code = main([
        "bench", "--model-size", "nano", "--attention", "cudnn", "--batch-size", "2", "--seq-len", "16", "--steps", "1",
        "--warmup", "0", "--gpus", "1", "--json", "--results", str(tmp_path / "r.jsonl"),
    ])
    assert code == 0
    row = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert row["attention_impl"] == "cudnn" and row["attention_path"] == "xla"
    assert "attn=cudnn(xla)" in row["case"]
    assert row["fallbacks"] == ["attention cudnn -> xla: cuDNN needs a GPU"]
