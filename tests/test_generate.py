import dataclasses

import jax
import jax.numpy as jnp
import pytest

from dsjax import model
from dsjax.config import load_config
from dsjax.infer.generate import (
    SamplingConfig, SamplingError, categorical_by_cdf, generate_tokens, generate_uncached_greedy, sample_token,
)

NANO = dataclasses.replace(load_config("nano").model, num_hidden_layers=2)


def test_cached_generation_equals_uncached_greedy():
    params = model.init(NANO, jax.random.key(0))
    # sharpen the output so greedy picks are not near-ties
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 50
    prompt = [1, 17, 400, 93, 5]
    cached = list(generate_tokens(params, NANO, prompt, SamplingConfig(max_new_tokens=16, temperature=0.0)))
    assert cached == generate_uncached_greedy(params, NANO, prompt, 16)
    assert len(cached) == 16


def test_generation_stops_at_eos():
    params = model.init(NANO, jax.random.key(1))
    first = next(generate_tokens(params, NANO, [1, 5], SamplingConfig(max_new_tokens=5, temperature=0.0)))
    assert list(generate_tokens(params, NANO, [1, 5], SamplingConfig(max_new_tokens=5, temperature=0.0), eos_id=first)) == []


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(2), (4, 50))
    greedy = jnp.argmax(logits, axis=-1)
    for s in (SamplingConfig(temperature=1.0, top_k=1), SamplingConfig(temperature=1.0, top_p=1e-6)):
        for seed in range(3):
            assert bool(jnp.all(sample_token(logits, jax.random.key(seed), s) == greedy))


def test_inverse_cdf_draws_follow_the_softmax_and_never_a_filtered_token():
    """categorical_by_cdf (one uniform per row) against the softmax, 40,000 draws; -inf never drawn."""
    logits = jnp.array([-jnp.inf, 1.0, -jnp.inf, 0.0, 2.0, -1.0, -jnp.inf])
    want = jax.nn.softmax(logits)
    keys = jax.random.split(jax.random.key(3), 40_000)
    draws = jax.jit(jax.vmap(lambda k: categorical_by_cdf(k, logits[None])[0]))(keys)
    freq = jnp.bincount(draws, length=logits.shape[0]) / draws.shape[0]
    assert int(jnp.sum(freq[jnp.array([0, 2, 6])] > 0)) == 0
    # 4.5 standard errors of a frequency near 0.5 over 40,000 draws is 0.011
    assert float(jnp.max(jnp.abs(freq - want))) < 0.011, (freq, want)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "--temperature"), ({"top_p": 0}, "--top-p"), ({"top_k": -2}, "--top-k"), ({"max_new_tokens": 0}, "--max-new-tokens")],
)
def test_bad_sampling_flags(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingConfig(**kwargs).validate()
