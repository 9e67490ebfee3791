"""On-device batched sampling equals the step-by-step sampler, and batched rows equal single rows."""

import jax
import pytest

from dsjax import model
from dsjax.config import load_config
from dsjax.infer.generate import SamplingConfig, generate_tokens
from dsjax.infer.sampler import sample_batch, stream_tokens


@pytest.fixture(scope="module")
def nano():
    c = load_config("nano", overrides={"model": {"compute_dtype": "float32", "max_position_embeddings": 64, "num_hidden_layers": 2}, "training": {"seq_len": 64}}).model
    return c, model.init(c, jax.random.key(3))


PROMPT_A = [5, 17, 99, 3, 250]
PROMPT_B = [7, 7, 1024, 11, 42, 8, 300]  # longer: its extra tokens are fed one step at a time


@pytest.mark.parametrize(
    "s",
    [SamplingConfig(max_new_tokens=12, temperature=0.0), SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=50, seed=4)],
    ids=["greedy", "sampled"],
)
def test_on_device_equals_step_by_step(nano, s):
    c, params = nano
    reference = list(generate_tokens(params, c, PROMPT_A, s))
    assert sample_batch(params, c, [PROMPT_A], s) == [reference]
    chunks = list(stream_tokens(params, c, PROMPT_A, s, chunk=5))  # chunked streaming
    assert [t for chunk in chunks for t in chunk] == reference and max(map(len, chunks)) == 5
    # batched rows equal single rows: row r samples with seed + r
    batch = sample_batch(params, c, [PROMPT_A, PROMPT_B, PROMPT_A], s)
    singles = [
        list(generate_tokens(params, c, p, SamplingConfig(**{**s.__dict__, "seed": s.seed + r})))
        for r, p in enumerate([PROMPT_A, PROMPT_B, PROMPT_A])
    ]
    assert batch == singles


def test_eos_and_cache_end_stop_each_row(nano):
    c, params = nano
    s = SamplingConfig(max_new_tokens=12, temperature=0.0)
    greedy = sample_batch(params, c, [PROMPT_A], s)[0]
    eos = greedy[3]
    first = greedy.index(eos)
    got = sample_batch(params, c, [PROMPT_A, PROMPT_B], s, eos_id=eos)
    assert got[0] == greedy[:first]  # EOS ends the row and is not returned
    assert got[1] == list(generate_tokens(params, c, PROMPT_B, s, eos_id=eos))
    # a prompt near max_position_embeddings: the cache end stops it like the step-by-step sampler
    long_prompt = list(range(1, 60))
    s_long = SamplingConfig(max_new_tokens=20, temperature=0.0)
    assert sample_batch(params, c, [long_prompt], s_long) == [list(generate_tokens(params, c, long_prompt, s_long))]


def test_rows_split_over_devices_give_the_same_tokens(nano):
    """`rows` splits the batch over 4 devices: each decodes its own rows (the state stays split), same tokens."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from dsjax.infer import sampler

    c, params = nano
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=50, seed=2)
    prompts = [PROMPT_A, PROMPT_B, PROMPT_A, PROMPT_B, PROMPT_B, PROMPT_A, PROMPT_A, PROMPT_B]
    mesh = jax.make_mesh((4,), ("dp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])  # as meshes/ builds
    rows = NamedSharding(mesh, PartitionSpec("dp"))
    assert sample_batch(params, c, prompts, s, rows=rows) == sample_batch(params, c, prompts, s)
    prefill, decode_chunk = sampler._programs(c, s, (), 17, 4, False, rows)
    inputs = jax.device_put((jax.numpy.zeros((8, 7), "int32"), jax.numpy.full((8,), 5, "int32"),
                             jax.numpy.stack([jax.random.key_data(jax.random.key(r)) for r in range(8)])), rows)
    state = decode_chunk(params, prefill(params, *inputs, 5), inputs[0], inputs[1])
    assert state.out_BN.sharding.spec[0] == "dp" and len(state.out_BN.sharding.device_set) == 4


def test_cache_lengths_round_up_to_a_multiple_of_128(nano):
    """So GPU GEMM tiles take the cache without a padded copy per token, and nearby prompt lengths share a program."""
    import dataclasses

    from dsjax.infer.sampler import CACHE_MULTIPLE, _cache_length

    c = dataclasses.replace(nano[0], max_position_embeddings=1100)
    assert CACHE_MULTIPLE == 128
    assert [_cache_length(c, 4, n) for n in (100, 124, 125, 1000)] == [128, 128, 256, 1024]
    assert _cache_length(c, 4, 1090) == 1100  # never past the model's positions


def test_one_row_decode_loop_copies_no_cache_buffer(nano):
    """XLA:CPU copied each [1, S, W] cache buffer three times per layer and token when one row was decoded
    (`mla._write_cache`); carried as [S, W] and written as a matrix, the loop writes each token in place."""
    import re

    import jax.numpy as jnp

    from dsjax.hlo_launches import computations
    from dsjax.infer import sampler

    c, params = nano
    s = SamplingConfig(max_new_tokens=8, temperature=0.8)
    prefill, decode_chunk = sampler._programs(c, s, (), c.max_position_embeddings, 8)
    prompts, prompt_len = jnp.asarray([PROMPT_A]), jnp.asarray([len(PROMPT_A)])
    state = prefill(params, prompts, prompt_len, jax.random.key_data(jax.random.key(0))[None], len(PROMPT_A))
    hlo = decode_chunk.lower(sampler._decode_layouts(params, c), state, prompts, prompt_len).compile().as_text()
    _, comps = computations(hlo)
    bodies = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo)
    S = c.max_position_embeddings
    cache_copies = [
        line for body in bodies for line in comps[body] if re.search(rf"\[(1,)?{S},\d+\]\S* copy\(", line)
    ]
    assert bodies and not cache_copies, cache_copies[:3]
