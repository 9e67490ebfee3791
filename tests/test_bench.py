"""`dsjax bench`: the FLOP formula against a hand count, and the --json fields through the CLI."""

import dataclasses
import json

from dsjax import bench
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
        "--peak-tflops", "1.0", "--gpus", "1", "--json", "--results", str(results),
    ])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 1
    row = rows[0]
    for key in (
        "device", "jax", "git_commit", "compile_sec", "step_ms_median", "step_ms_p10", "step_ms_p90",
        "steps_per_sec", "tokens_per_sec", "flops_per_token", "mfu", "peak_memory_gib", "compiled_memory_gib",
        "moe_impl", "attention_impl", "seq_len", "batch_size",
    ):
        assert key in row, key
    assert row["batch_size"] == 2 and row["seq_len"] == 32
    assert row["tokens_per_sec"] > 0 and row["compile_sec"] > 0
    assert row["flops_per_token"] == bench.train_flops_per_token(load_config("nano").model, 32)
    expected_mfu = row["flops_per_token"] * 64 / (row["step_ms_median"] / 1e3) / 1e12
    assert abs(row["mfu"] - expected_mfu) <= 1e-3 * expected_mfu + 1e-4
    assert [json.loads(line)["case"] for line in results.read_text().splitlines()] == [row["case"]]


def test_bench_rejects_bad_lists(capsys):
    assert main(["bench", "--moe", "fast"]) == 2
    assert "--moe: unknown value 'fast'" in capsys.readouterr().err
    assert main(["bench", "--remat", "some"]) == 2
    assert "--remat: unknown value 'some' (none, full, save_dots)" in capsys.readouterr().err
    assert main(["bench", "--model-size", "huge"]) == 2
    assert main(["bench", "--seq-len", "abc"]) == 2
    assert main(["bench", "--backend", "mlx", "--moe", "dense"]) == 2
    assert "pick JAX compute paths" in capsys.readouterr().err
