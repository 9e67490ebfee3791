"""Post-training pieces: instruction data, reward terms, GRPO's advantages and loss, the GRPO loop, evaluation."""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import model
from dsjax.config import load_config
from dsjax.data.tokenizer import load_or_train_tokenizer
from dsjax.posttrain import grpo as G
from dsjax.posttrain.instructions import (
    ADJECTIVES,
    NOUNS,
    VERBS,
    heldout_split,
    instructions_from_instruct_file,
    instructions_from_stories,
    story_features,
)
from dsjax.posttrain.rewards import RewardSpec, clean_ending, contains_word, coverage, length_score, repetition, reward_terms

# --- reward terms ------------------------------------------------------------------


def test_coverage_whole_words_case_and_inflections():
    text = "The Dogs jumped over a RED box. Hopping is fun; they were crying."
    assert contains_word(text, "dog") and contains_word(text, "jump") and contains_word(text, "red")
    assert contains_word(text, "hop") and contains_word(text, "cry")  # doubling, y -> ied/ying
    assert not contains_word(text, "ox")  # inside "box": not a whole word
    assert not contains_word("the redwood", "red") and not contains_word("bred", "red")
    assert not contains_word("he ran home", "run")  # irregular forms do not count
    assert coverage(text, ("dog", "cat", "red", "jump")) == 0.75
    assert coverage(text, ()) == 1.0


def test_clean_ending_length_and_repetition():
    assert clean_ending("They were happy.", stopped=True) == 1.0
    assert clean_ending('"Let\'s go!" she said."', stopped=True) == 1.0  # closing quote after the period
    assert clean_ending("They were happy.", stopped=False) == 0.0  # cut by the length limit
    assert clean_ending("They were", stopped=True) == 0.0  # stopped mid-sentence
    words = lambda n: " ".join(f"w{i}" for i in range(n))  # noqa: E731
    assert length_score(words(10), 40, 180) == 0.25
    assert length_score(words(40), 40, 180) == length_score(words(180), 40, 180) == 1.0
    assert length_score(words(270), 40, 180) == 0.5 and length_score(words(400), 40, 180) == 0.0
    assert repetition("a b c d e") == 0.0
    assert repetition("the cat sat the cat sat") == pytest.approx(1 - 3 / 4)  # 4 trigrams, 3 distinct
    assert repetition("to be") == 0.0


def test_reward_is_the_weighted_sum():
    spec = RewardSpec(
        coverage_weight=1.0, ending_weight=0.5, length_weight=0.25, repetition_weight=2.0, min_words=4, max_words=10
    )
    terms = reward_terms("the dog and the dog and a cat.", stopped=True, words=("dog", "bird"), spec=spec)
    # coverage 1/2, ending 1, length 1 (8 words), repetition 1 - 5/6 (6 trigrams, 5 distinct)
    assert terms["coverage"] == 0.5 and terms["ending"] == 1.0 and terms["length"] == 1.0
    assert terms["repetition"] == pytest.approx(1 / 6)
    assert terms["reward"] == pytest.approx(0.5 + 0.5 + 0.25 - 2.0 / 6)


# --- instruction data --------------------------------------------------------------


def test_instructions_from_real_stories(tinystories_dir):
    path = tinystories_dir / "valid" / "stories.jsonl"
    instructions = instructions_from_stories(path)
    assert len(instructions) == 100
    assert instructions == instructions_from_stories(path)  # deterministic
    assert sum(len(i.words) == 3 for i in instructions) >= 70
    for ins in instructions:
        assert ins.response and ins.prompt.startswith("Write a story")
        for word, vocabulary in zip(ins.words, (NOUNS, VERBS, ADJECTIVES)):
            assert contains_word(ins.response, word)
        for word in ins.words:
            if word in NOUNS or word in ADJECTIVES:  # verbs may appear inflected (jumped)
                assert re.search(rf"\b{word}", ins.response, re.IGNORECASE)
            assert word in ins.prompt
        assert set(ins.features) <= set(story_features(ins.response))
        if "dialogue" in ins.features:
            assert '"' in ins.response or "\u201c" in ins.response
    assert {f for i in instructions for f in i.features} == {"dialogue", "happy ending", "sad ending"}
    other = instructions_from_stories(path, with_features=False, seed=1)
    assert all(not i.features for i in other) and [i.words for i in other] != [i.words for i in instructions]
    evals, rest = heldout_split(instructions, 10, seed=0)
    assert len(evals) == 10 and len(rest) == 90 and not {id(i) for i in evals} & {id(i) for i in rest}
    assert heldout_split(instructions, 10, seed=0)[0] == evals


INSTRUCT_TEXT = """Features: Dialogue, BadEnding
Words: quit, oak, gloomy
Summary: Sara and Ben play in the park.
Story: 

Sara and Ben were playing in the park.
"Ben, I want to quit," she said.
<|endoftext|>
Summary: No story here.
<|endoftext|>
Words: escape, war, tall
Story:
Tom and Lily wanted to escape.
Summary: Tom and Lily escape.
Random sentence: The trees were tall.
Features: Twist
Story:
A second story without a separator.
<|endoftext|>
"""


def test_instruct_format_parsing(tmp_path):
    path = tmp_path / "instruct.txt"
    path.write_text(INSTRUCT_TEXT)
    first, second, third = instructions_from_instruct_file(path)  # the record without a story is skipped
    assert first.prompt == (
        "Write a story that uses the words: quit, oak, gloomy. The story has dialogue. The story has a sad ending. "
        "Summary: Sara and Ben play in the park."
    )
    assert first.response == 'Sara and Ben were playing in the park.\n"Ben, I want to quit," she said.'
    assert first.words == ("quit", "oak", "gloomy") and first.features == ("dialogue", "sad ending")
    assert second.prompt == (
        "Write a story that uses the words: escape, war, tall. The story has a plot twist. "
        "Use the sentence: The trees were tall. Summary: Tom and Lily escape."
    )
    assert second.response == "Tom and Lily wanted to escape."
    assert third.prompt == "Write a story." and third.response == "A second story without a separator."


# --- advantages and the loss -----------------------------------------------------------


def test_group_advantages():
    rewards = np.array([[1.0, 2.0, 3.0, 6.0], [0.1, 0.1, 0.1, 0.1], [-1.0, 1.0, -1.0, 1.0]], np.float32)
    adv = np.asarray(G.group_advantages(rewards))
    np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv[0], (rewards[0] - 3.0) / (np.std(rewards[0]) + G.STD_EPS), rtol=1e-6)
    np.testing.assert_allclose(adv[2], [-1, 1, -1, 1], rtol=1e-3)  # std 1
    assert np.all(adv[1] == 0.0)  # equal rewards: exactly zero, not merely small
    np.testing.assert_allclose(np.asarray(G.group_advantages(rewards, scale=False))[0], [-2, -1, 0, 3], atol=1e-6)


def _hand_batch():
    """Two rows of three tokens; row 0's last token is padding. See test_loss_by_hand for the arithmetic."""
    logp = jnp.array([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    old = logp - jnp.array([[0.0, 0.5, 3.0], [0.0, -0.5, 0.0]])  # ratios: [1, e^0.5, (pad)], [1, e^-0.5, 1]
    ref = logp + jnp.array([[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]])  # one token with ref/pi = 2
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logp, old, ref, jnp.array([1.0, -2.0]), mask


@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_loss_by_hand(aggregation):
    spec = G.ObjectiveSpec(epsilon=0.2, epsilon_high=0.0, beta=0.1, aggregation=aggregation, max_new_tokens=4)
    loss, metrics = G.grpo_objective(*_hand_batch(), spec)
    kl = 1 - math.log(2)  # k3 at ref/pi = 2: 2 - log 2 - 1
    # row 0 (A = 1): ratio 1 -> -1; ratio e^0.5 clipped to 1.2 -> -1.2
    # row 1 (A = -2): ratio 1 -> 2 (+ 0.1 * kl); ratio e^-0.5 clipped to 0.8 -> -min(-1.21, -1.6) = 1.6; ratio 1 -> 2
    row0, row1 = [-1.0, -1.2], [2.0 + 0.1 * kl, 1.6, 2.0]
    expected = {
        "grpo": (sum(row0) / 2 + sum(row1) / 3) / 2,
        "dr_grpo": (sum(row0) + sum(row1)) / (2 * 4),
        "dapo": (sum(row0) + sum(row1)) / 5,
    }[aggregation]
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["kl"]) == pytest.approx(kl / 5, rel=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 5)
    upper = G.ObjectiveSpec(epsilon=0.2, epsilon_high=1.0, beta=0.1, aggregation="dapo", max_new_tokens=4)
    assert float(G.grpo_objective(*_hand_batch(), upper)[1]["clip_fraction"]) == pytest.approx(1 / 5)  # e^0.5 < 2


def test_prompt_order_and_batch_layout():
    from dsjax.posttrain.grpo_loop import build_batch, step_prompts

    seen = [i for step in range(1, 6) for i in step_prompts(10, step, 4, seed=3)]  # 20 = two passes over 10
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # each pass reshuffled
    assert step_prompts(10, 4, 4, seed=3) == seen[12:16]  # a step's prompts depend only on the step (resume)
    tokens, mask = build_batch([[1, 4, 9], [1, 4]], [[7, 8, 6], [5]], length=7, pad_id=3)
    assert tokens.tolist() == [[1, 4, 9, 7, 8, 6, 3], [1, 4, 5, 3, 3, 3, 3]]
    # mask[t] = 1 where tokens[t + 1] was sampled
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]


# --- the model-facing pieces (one tiny model) ------------------------------------------

TINY = {
    "model": {
        "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "moe_intermediate_size": 16, "n_routed_experts": 4, "n_group": 2,
        "topk_group": 1, "num_experts_per_tok": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "max_position_embeddings": 128, "compute_dtype": "float32",
        "num_nextn_predict_layers": 0,
    },
    "training": {"seq_len": 32, "batch_size": 4, "max_to_keep": 5},
    "grpo": {
        "max_steps": 2, "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8, "eval_prompts": 4,
        "eval_interval": 1, "samples_per_eval": 2, "updates_per_batch": 2, "beta": 0.04, "min_words": 2,
        "max_words": 6, "learning_rate": 1e-3,
    },
}


def _numpy_init(c, seed=0):
    """Random weights made by NumPy (model.init compiles a program per leaf: seconds the tests need not pay)."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(a.shape, a.dtype)
        if name == "e_score_correction_bias":
            return jnp.zeros(a.shape, a.dtype)
        return jnp.asarray(rng.normal(0.0, c.initializer_range, a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, model.abstract_params(c))


@pytest.fixture(scope="module")
def tiny():
    config = load_config("nano", overrides=TINY)
    return config, _numpy_init(config.model)


@pytest.fixture(scope="module")
def tokenizer(tinystories_dir, tmp_path_factory):
    return load_or_train_tokenizer(tinystories_dir, tmp_path_factory.mktemp("work"), 512)


def _random_batch(B=4, L=12, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, L), 7, 512)
    mask = np.zeros((B, L - 1), np.float32)
    mask[:, 4:] = 1.0
    mask[1, 9:] = 0.0  # a shorter completion
    return tokens, jnp.asarray(mask)


reference_logprobs = jax.jit(G.token_logprobs_reference, static_argnums=2)  # one compile for both tests below


def test_chunked_logprobs_match_the_reference(tiny):
    config, params = tiny
    tokens, _ = _random_batch()
    want_logp, want_entropy = reference_logprobs(params, tokens, config.model)
    chunked = jax.jit(lambda p, t: G.token_logprobs(p, t, config.model, chunk_tokens=7))  # 44 tokens: 7 chunks
    got_logp, got_entropy = chunked(params, tokens)
    np.testing.assert_allclose(got_logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_entropy, want_entropy, rtol=1e-5, atol=1e-5)


def test_equal_rewards_give_exactly_zero_policy_gradient(tiny):
    config, params = tiny
    tokens, mask = _random_batch()
    spec = G.ObjectiveSpec(beta=0.0, aggregation="grpo", max_new_tokens=8)

    grad = jax.jit(jax.grad(lambda p, b: G.policy_loss(p, b, config.model, spec)[0]))
    logp = reference_logprobs(params, tokens, config.model)[0]

    def grads_for(rewards, old):
        adv = G.group_advantages(jnp.asarray(rewards, jnp.float32)).reshape(-1)
        return grad(params, {"tokens": tokens, "mask": mask, "adv": adv, "old": old})

    zero = grads_for([[0.3, 0.3], [0.7, 0.7]], logp)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(zero))
    shifted = grads_for([[0.3, 0.3], [0.7, 0.7]], logp + 0.05)  # mu > 1: ratios away from 1
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(shifted))
    some = grads_for([[0.3, 0.9], [0.7, 0.7]], logp)
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(some))) > 0


def test_sampler_two_stop_ids_and_kept_stop(tiny):
    from dsjax.infer.generate import SamplingConfig
    from dsjax.infer.sampler import sample_batch

    config, params = tiny
    s = SamplingConfig(max_new_tokens=10, temperature=0.0)
    prompt = [1, 4, 40, 41, 42, 6, 5]
    free = sample_batch(params, config.model, [prompt], s)[0]
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # the first new token after the first
    never = next(t for t in range(7, 512) if t not in free)
    stops = (never, free[k])  # either id stops a row
    kept = sample_batch(params, config.model, [prompt, prompt], s, eos_id=stops, keep_stop=True, prefill_len=3, cache_len=40)
    assert kept == [free[: k + 1], free[: k + 1]]  # the stop token is returned last (without it: test_sampler.py)


# --- the GRPO loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_run(tiny, tokenizer, tinystories_dir, tmp_path_factory):
    """Three GRPO steps, stopped by SIGTERM during step 2 (checkpoint, exit 143), then resumed to the end."""
    import os
    import signal

    from dsjax.config import config_from_dict
    from dsjax.posttrain import grpo_loop
    from dsjax.train import checkpoint
    from dsjax.train.signals import StopRequested

    root = tmp_path_factory.mktemp("grpo")
    config, params = tiny
    config = config_from_dict(
        {"training": {"data_dir": str(tinystories_dir), "work_dir": str(root / "data"),
                      "checkpoint_dir": str(root / "checkpoints"), "output_dir": str(root / "outputs")},
         "grpo": {"max_steps": 3, "eval_interval": 2}},
        config,
    )
    start = checkpoint.save_final(root / "checkpoints" / "t-sft", params, config, {"step": 0}, tokenizer.path)
    real_step_prompts = grpo_loop.step_prompts

    def preempted_at_step_2(pool, step, per_step, seed):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the loop finishes the step first
        return real_step_prompts(pool, step, per_step, seed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo_loop, "step_prompts", preempted_at_step_2)
        with pytest.raises(StopRequested) as stopped:
            grpo_loop.grpo(config, "t-grpo", start, device_count=1)
    ckpt = root / "checkpoints" / "t-grpo"
    stopped_at = (stopped.value.exit_code, checkpoint.committed_steps(ckpt), (ckpt / "final").exists())
    summary = grpo_loop.grpo(config, "t-grpo", start, resume=True, device_count=1)
    return {"root": root, "start": start, "stopped": stopped_at, "summary": summary, "params": params,
            "data": tinystories_dir, "config": config}


def test_grpo_loop_writes_outputs_and_resumes(grpo_run):
    from dsjax.train import checkpoint

    assert grpo_run["stopped"] == (143, [2], False)
    assert grpo_run["summary"]["step"] == 3
    out, ckpt = grpo_run["root"] / "outputs" / "t-grpo", grpo_run["root"] / "checkpoints" / "t-grpo"
    assert {"metrics.csv", "samples.jsonl", "loss.png", "training_log.json"} <= {p.name for p in out.iterdir()}
    assert checkpoint.committed_steps(ckpt) == [2, 3] and (ckpt / "final" / "tokenizer.model").is_file()
    header, *body = (out / "metrics.csv").read_text().splitlines()
    assert "reward,reward_std,coverage,ending" in header
    rows = [dict(zip(header.split(","), line.split(","))) for line in body]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [bool(r["eval_reward"]) for r in rows] == [False, True, True]  # every eval_interval and the last step
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["kl"]) >= 0 and 0 <= float(r["clip_fraction"]) <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 3, 3] and {"completion", "coverage", "reward"} <= set(samples[0])
    final, _, _ = checkpoint.load_final(ckpt / "final")
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(grpo_run["params"])))


def test_grpo_step_on_a_mesh_matches_one_device(tiny):
    """dp x tp x ep: the state in pretraining's layout, the batch split over dp x ep, the log-probs over
    split logits; the same old/ref log-probs, loss, metrics and updated weights as one device."""
    from dsjax.config import config_from_dict
    from dsjax.posttrain.grpo_loop import grpo_training_config
    from dsjax.train import distributed
    from dsjax.train.step import TrainState, state_shardings_for

    config, params = tiny
    tokens, mask = _random_batch()
    spec = G.ObjectiveSpec.from_config(config.grpo)
    tcfg = grpo_training_config(config)
    adv = G.group_advantages(jnp.asarray([[0.1, 0.9], [0.6, 0.2]])).reshape(-1)
    optimizer = G.make_optimizer(tcfg)
    fresh = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))  # noqa: E731

    def run(mesh, shardings):
        logprobs = G.make_logprobs(config.model, mesh=mesh)
        place = (lambda b: b) if mesh is None else (lambda b: jax.device_put(b, G.batch_shardings(b, mesh)))  # noqa: E731
        policy = params if mesh is None else jax.device_put(params, shardings.params)
        batch = place({"tokens": tokens, "mask": mask, "adv": adv})
        batch = place({**batch, "old": logprobs(policy, batch["tokens"]) - 0.01, "ref": logprobs(policy, batch["tokens"])})
        state = jax.jit(fresh, out_shardings=shardings)(jax.tree.map(jnp.copy, policy))
        new_state, metrics = G.make_grpo_step(config.model, spec, tcfg, mesh=mesh)(state, batch)
        return jax.device_get((batch["old"], metrics, new_state.params))

    one_old, one, one_params = run(None, None)
    meshed = config_from_dict({"distributed": {"dp_size": 2, "tp_size": 2, "ep_size": 2}}, config)
    mesh, shape = distributed.setup_mesh(meshed, 8)
    shardings = state_shardings_for(dataclasses.replace(meshed, training=tcfg), mesh, stages=1)
    assert any(len(set(s.spec) - {None}) for s in jax.tree.leaves(shardings.params))  # weights really split
    old, on_mesh, mesh_params = run(mesh, shardings)
    np.testing.assert_allclose(old, one_old, rtol=1e-5, atol=1e-6)
    for key in ("loss", "kl", "entropy", "clip_fraction", "policy_loss", "grad_norm", "lr"):
        np.testing.assert_allclose(float(on_mesh[key]), float(one[key]), rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(mesh_params), jax.tree.leaves(one_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grpo_run_on_a_dp_mesh_matches_one_device(grpo_run, tokenizer):
    """The loop on 2 devices (dp 2): the same samples (rewards equal exactly) and the same step as one device."""
    from dsjax.config import config_from_dict
    from dsjax.posttrain import grpo_loop

    root = grpo_run["root"]
    config = config_from_dict({"grpo": {"max_steps": 1}, "distributed": {"dp_size": 2}}, grpo_run["config"])
    grpo_loop.grpo(config, "t-grpo-dp", grpo_run["start"], device_count=2)
    one, two = (_csv_rows(root / "outputs" / name / "metrics.csv")[0] for name in ("t-grpo", "t-grpo-dp"))
    for key in ("reward", "reward_std", "coverage", "ending", "response_tokens"):
        assert two[key] == one[key], key
    for key in ("loss", "kl", "entropy", "clip_fraction", "grad_norm"):
        np.testing.assert_allclose(float(two[key]), float(one[key]), rtol=1e-5, atol=1e-7, err_msg=key)


def test_grpo_mesh_checks_name_grpo_rows_not_the_training_batch():
    """`dsjax run --stages grpo` on dp 3: GRPO's rows (8 x 3 = 24) split, the training block's batch (16) does not
    and is not GRPO's, so nothing is refused; 9 rows that do not split are refused by the GRPO rule first."""
    import argparse

    from dsjax.cli import check_mesh
    from dsjax.config import config_from_dict
    from meshes.mesh import MeshError

    args = argparse.Namespace(gpus=3)
    config = config_from_dict({"training": {"batch_size": 16}, "grpo": {"prompts_per_step": 8, "group_size": 3},
                               "distributed": {"dp_size": 3}}, load_config("nano"))
    check_mesh(config, args, ["grpo"])
    with pytest.raises(MeshError, match="batch_size=16 is not divisible"):  # pretraining's batch still counts there
        check_mesh(config, args, ["pretrain", "sft", "grpo"])
    odd = config_from_dict({"training": {"batch_size": 5}, "grpo": {"prompts_per_step": 3}, "distributed": {"dp_size": 2}},
                           config)  # neither 9 rows nor a batch of 5 split over dp 2: the GRPO rule speaks
    with pytest.raises(MeshError, match=r"3 prompts x 3 samples = 9 rows do not split over the data-parallel size dp\*ep=2"):
        check_mesh(odd, argparse.Namespace(gpus=2), ["grpo"])


def _csv_rows(path):
    header, *body = path.read_text().splitlines()
    return [dict(zip(header.split(","), line.split(","))) for line in body]


# --- evaluation ------------------------------------------------------------------------


def test_bootstrap_intervals():
    from dsjax.posttrain.evaluate import bootstrap, bootstrap_ratio, paired_difference

    values = np.random.default_rng(0).normal(size=200)
    low, high = bootstrap(values)
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.2)
    assert bootstrap(np.full(10, 0.5)) == (0.5, 0.5)
    diff = paired_difference(values, values + 1.0)  # a constant shift: no spread at all when paired
    assert diff["mean"] == pytest.approx(1.0) and diff["low"] == pytest.approx(1.0) and diff["high"] == pytest.approx(1.0)
    assert bootstrap_ratio(np.full(5, math.log(2)), np.ones(5)) == pytest.approx((1.0, 1.0))


def test_eval_command_compares_checkpoints(grpo_run, capsys):
    from dsjax.cli import main

    root = grpo_run["root"]
    argv = ["eval", "--checkpoint", str(grpo_run["start"]), "--checkpoint", str(root / "checkpoints" / "t-grpo" / "final"),
            "--prompts", "4", "--samples", "1", "--data-dir", str(grpo_run["data"]), "--work-dir", str(root / "data")]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["checkpoints"]) == ["t-sft", "t-grpo"] and list(result["differences"]) == ["t-grpo - t-sft"]
    for summary in result["checkpoints"].values():
        for key in ("coverage", "ending", "reward", "val_bpb"):
            assert summary[key]["low"] <= summary[key]["mean"] <= summary[key]["high"]
        assert 0 <= summary["coverage"]["mean"] <= 1 and summary["val_bpb"]["mean"] > 0
    assert result["settings"]["prompts"] == 4 and result["windows"] > 0
    assert main(argv[:3] + ["--prompts", "0"]) == 2
    assert "--prompts must be >= 1" in capsys.readouterr().err


def test_compared_checkpoints_share_their_bits_per_byte_windows(grpo_run, tmp_path):
    """An SFT final records a longer training.seq_len than the pretrained one; the table still scores every
    checkpoint on the same windows (the settings' length), so its bits/byte difference is paired."""
    import shutil

    from dsjax.posttrain.evaluate import EvalSettings, score_checkpoint
    from dsjax.train.checkpoint import read_final_config

    longer = tmp_path / "longer" / "final"
    shutil.copytree(grpo_run["start"], longer)
    saved = json.loads((longer / "config.json").read_text())
    saved["training"]["seq_len"] = 2 * saved["training"]["seq_len"]
    (longer / "config.json").write_text(json.dumps(saved))
    settings = EvalSettings.from_config(read_final_config(grpo_run["start"]), prompts=1, samples=1, max_new_tokens=4)
    a, b = (score_checkpoint(f, settings, grpo_run["data"], grpo_run["root"] / "data") for f in (grpo_run["start"], longer))
    assert len(a.nats) == len(b.nats) and np.array_equal(a.bytes, b.bytes)
    np.testing.assert_allclose(b.nats, a.nats, rtol=1e-5)  # the same weights on the same windows
