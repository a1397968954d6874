"""The engine's sampler: per-row parameters, no dependence on batch neighbours, each filter's effect."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.engine.sampling import SamplingParams, SamplingRows, sample

LOGITS = np.log(np.asarray([0.4, 0.3, 0.2, 0.1, 1e-9], np.float32))  # V = 5, token 0 the most likely


def _draw(params, seeds, token_indices, logits=None, seen=None, num_logprobs=0):
    rows = len(params)
    logits = np.broadcast_to(LOGITS, (rows, LOGITS.size)) if logits is None else logits
    batch = SamplingRows.build(params, seeds, token_indices, rows)
    filtered = any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params)
    penalised = any(p.repetition_penalty != 1 for p in params)
    return sample(jnp.asarray(logits), batch, None if seen is None else jnp.asarray(seen), filtered=filtered,
                  penalised=penalised, num_logprobs=num_logprobs)


@pytest.mark.parametrize("field, value", [("n", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                          ("top_k", -2), ("min_p", 2.0), ("max_tokens", 0), ("min_tokens", 99),
                                          ("repetition_penalty", 0.0), ("logprobs", -1)])
def test_out_of_range_parameters_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})


def test_a_rows_tokens_do_not_depend_on_its_neighbours():
    me = SamplingParams(temperature=1.0, seed=7)
    alone = [int(_draw([me], [7], [i])[0][0]) for i in range(20)]
    neighbours = [SamplingParams(temperature=0.0), SamplingParams(top_k=2), SamplingParams(min_p=0.3, temperature=2.0)]
    for i in range(20):
        tokens = _draw([neighbours[i % 3], me, *neighbours], [1, 7, 2, 3, 4], [5, i, 6, 7, 8])[0]
        assert int(tokens[1]) == alone[i]
    assert len(set(alone)) > 1, "the draws should vary with the token index"


def test_temperature_sampling_follows_the_softmax():
    count = 4000
    params = [SamplingParams(temperature=1.0)] * count
    tokens = np.asarray(_draw(params, list(range(count)), [0] * count)[0])
    frequencies = np.bincount(tokens, minlength=5) / count
    np.testing.assert_allclose(frequencies, np.exp(LOGITS), atol=0.03)


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(temperature=0.0), {0}),
    (SamplingParams(top_k=1), {0}),
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_p=0.5), {0, 1}),  # 0.4 alone is short of 0.5; 0.4 + 0.3 reaches it
    (SamplingParams(top_p=0.4), {0}),
    (SamplingParams(min_p=0.6), {0, 1}),  # 0.3 >= 0.6 * 0.4; 0.2 is not
    (SamplingParams(min_p=0.6, top_k=1, temperature=3.0), {0}),
])
def test_each_filter_keeps_exactly_its_tokens(params, allowed):
    count = 400
    tokens = set(np.asarray(_draw([params] * count, list(range(count)), [3] * count)[0]).tolist())
    assert tokens == allowed


def test_repetition_penalty_turns_greedy_away_from_seen_tokens():
    seen = np.zeros((2, 5), bool)
    seen[:, 0] = True
    greedy = SamplingParams(temperature=0.0)
    tokens = _draw([greedy, SamplingParams(temperature=0.0, repetition_penalty=4.0)], [0, 0], [0, 0], seen=seen)[0]
    assert tokens.tolist() == [0, 1]  # log 0.4 * 4 < log 0.3: the penalised row moves on


def test_logprobs_are_the_models_own():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 11)), np.float32)
    tokens, token_logprobs, top_ids, top_logprobs = _draw(
        [SamplingParams(temperature=2.0, top_k=3)] * 3, [1, 2, 3], [0, 0, 0], logits=logits, num_logprobs=4)
    reference = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(token_logprobs, reference[np.arange(3), np.asarray(tokens)], rtol=1e-6)
    np.testing.assert_array_equal(top_ids, np.argsort(-reference, axis=-1)[:, :4])
    np.testing.assert_allclose(top_logprobs, np.sort(reference, axis=-1)[:, ::-1][:, :4], rtol=1e-6)


def test_the_static_switches_skip_work_without_changing_a_token():
    logits = jnp.asarray(np.asarray(jax.random.normal(jax.random.key(1), (4, 9)), np.float32))
    rows = SamplingRows.build([SamplingParams(temperature=0.0)] * 4, [0, 1, 2, 3], [0] * 4, 4)
    full = sample(logits, rows, filtered=True, penalised=False, random=True, num_logprobs=2)
    lean = sample(logits, rows, filtered=False, penalised=False, random=False, num_logprobs=None)
    np.testing.assert_array_equal(full[0], lean[0])
    np.testing.assert_array_equal(lean[0], np.argmax(np.asarray(logits), axis=-1))
    assert lean[2].shape == (4, 0) and full[2].shape == (4, 2)
