import dataclasses

import jax
import jax.numpy as jnp
import pytest

from dsjax import model
from dsjax.config import load_config
from dsjax.infer.generate import SamplingConfig, SamplingError, generate_tokens, generate_uncached_greedy, sample_token

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


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "--temperature"), ({"top_p": 0}, "--top-p"), ({"top_k": -2}, "--top-k"), ({"max_new_tokens": 0}, "--max-new-tokens")],
)
def test_bad_sampling_flags(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        SamplingConfig(**kwargs).validate()
