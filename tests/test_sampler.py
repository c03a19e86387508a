"""Sampler on synthetic logits: each parameter changes what is drawn, and seeds are batch-independent."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from ernie_engine.sampler import NO_TOKEN, Sampler, argmax_only, score_prompt_rows
from ernie_engine.sampling_params import SamplingParams
from ernie_engine.sequence import Request, Sequence

V = 8
EOS = 7


def make_seq(prompt=(5,), output=(), index=0, request_id="r", bad_words_ids=(), **params) -> Sequence:
    sp = SamplingParams(**params).with_defaults({})
    request = Request(request_id, list(prompt), sp, max_tokens=100, stop_token_ids=frozenset({EOS}),
                      eos_token_ids=frozenset({EOS}), bad_words_ids=[list(w) for w in bad_words_ids],
                      seed=sp.seed)
    request.sequences = [Sequence.create(request, i) for i in range(index + 1)]
    seq = request.sequences[index]
    seq.token_ids += list(output)
    return seq


def sample_one(logits, seq: Sequence):
    return Sampler()(np.array([logits], dtype=np.float32), [seq])[0]


def draw_counts(logits, n=300, **params) -> collections.Counter:
    seq = make_seq(seed=0, **params)
    return collections.Counter(sample_one(logits, seq).token_id for _ in range(n))


PEAKED = [2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
# Probabilities 0.5, 0.3, 0.12, 0.08 over the first four tokens.
FOUR = list(np.log([0.5, 0.3, 0.12, 0.08, 1e-9, 1e-9, 1e-9, 1e-9]))


def test_greedy_is_argmax():
    assert sample_one([0, 1, 5, 2, 0, 0, 0, 0], make_seq(temperature=0.0)).token_id == 2
    assert sample_one([0, 1, 5, 2, 0, 0, 0, 0], make_seq(temperature=1.0, top_k=1)).token_id == 2


def test_temperature_sharpens_and_flattens():
    assert draw_counts(PEAKED, temperature=0.2)[0] > 0.95 * 300
    assert draw_counts(PEAKED, temperature=5.0)[0] < 0.4 * 300


def test_top_k_keeps_only_k_tokens():
    assert set(draw_counts(PEAKED, temperature=10.0, top_k=2)) == {0, 1}
    assert len(draw_counts(PEAKED, temperature=10.0)) > 2


def test_top_p_keeps_the_smallest_set_reaching_p():
    assert set(draw_counts(FOUR, temperature=1.0, top_p=0.75)) == {0, 1}
    assert set(draw_counts(FOUR, temperature=1.0, top_p=0.85)) == {0, 1, 2}


def test_extreme_top_p_and_repetition_penalty_still_sample():
    """Values below float32's range (top_p 1e-300, a penalty dividing logits to inf) used to raise IndexError
    or draw from NaNs, failing the whole step."""
    assert set(draw_counts(FOUR, temperature=1.0, top_p=1e-300)) == {0}
    seq = make_seq(prompt=(0,), temperature=1.0, repetition_penalty=1e-300, seed=0)
    assert sample_one(PEAKED, seq).token_id == 0  # its logit 2.0 / ~0 is the largest finite float
    masked = make_seq(prompt=(0, 1), temperature=1.0, repetition_penalty=1e-300, bad_words_ids=[(0,)], seed=0)
    assert sample_one(PEAKED, masked).token_id == 1


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert set(draw_counts(FOUR, temperature=1.0, min_p=0.3)) == {0, 1}
    assert set(draw_counts(FOUR, temperature=1.0, min_p=0.1)) == {0, 1, 2, 3}


def test_repetition_penalty_covers_prompt_and_output():
    logits = [3.0, 2.9, -1.0, -1.05, 0, 0, 0, 0]
    assert sample_one(logits, make_seq(temperature=0.0, output=[0])).token_id == 0
    assert sample_one(logits, make_seq(temperature=0.0, output=[0], repetition_penalty=1.2)).token_id == 1
    assert sample_one(logits, make_seq(temperature=0.0, prompt=[0], repetition_penalty=1.2)).token_id == 1
    # Negative logits are multiplied: token 2 (-1.0) falls below token 3 (-1.05) once penalised.
    masked = [-9.0, -9.0, -1.0, -1.05, -9, -9, -9, -9]
    assert sample_one(masked, make_seq(temperature=0.0, output=[2], repetition_penalty=1.2)).token_id == 3


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = [3.0, 2.9, 0, 0, 0, 0, 0, 0]
    assert sample_one(logits, make_seq(temperature=0.0, output=[0, 0], frequency_penalty=0.06)).token_id == 1
    assert sample_one(logits, make_seq(temperature=0.0, output=[0], frequency_penalty=0.06)).token_id == 0
    assert sample_one(logits, make_seq(temperature=0.0, output=[0], presence_penalty=0.2)).token_id == 1
    assert sample_one(logits, make_seq(temperature=0.0, prompt=[0], presence_penalty=0.2)).token_id == 0


def test_bad_words_single_and_multi_token():
    logits = [0, 0, 0, 9.0, 8.0, 0, 0, 0]
    assert sample_one(logits, make_seq(temperature=0.0, bad_words_ids=[[3]])).token_id == 4
    # [1, 3] bans 3 only right after 1.
    assert sample_one(logits, make_seq(temperature=0.0, output=[2], bad_words_ids=[[1, 3]])).token_id == 3
    assert sample_one(logits, make_seq(temperature=0.0, output=[1], bad_words_ids=[[1, 3]])).token_id == 4


def test_logit_bias_is_added_before_the_choice():
    logits = [0, 0, 0, 9.0, 8.0, 0, 0, 0]
    assert sample_one(logits, make_seq(temperature=0.0, logit_bias={3: -2.0})).token_id == 4
    assert sample_one(logits, make_seq(temperature=0.0, logit_bias={"6": 100})).token_id == 6
    assert set(draw_counts(FOUR, temperature=1.0, logit_bias={0: -100, 1: -100})) == {2, 3}


def test_allowed_token_ids_mask_everything_else():
    logits = [0, 0, 0, 9.0, 8.0, 0, 0, 0]
    assert sample_one(logits, make_seq(temperature=0.0, allowed_token_ids=[1, 4])).token_id == 4
    assert set(draw_counts(PEAKED, temperature=5.0, allowed_token_ids=[2, 5])) == {2, 5}
    for bad in ([], 5, 1.5, True):  # scalars raised TypeError ("'int' object is not iterable"): a 500
        with pytest.raises(ValueError, match="allowed_token_ids"):
            SamplingParams.from_dict({"allowed_token_ids": bad})


@pytest.mark.parametrize(("params", "message"), [
    ({"n": 2.5}, "n must be an integer, got 2.5"), ({"n": None}, "n must be an integer, got None"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer"), ({"seed": 1.5}, "seed must be an integer"),
    ({"logprobs": True}, "logprobs must be an integer"), ({"temperature": float("inf")}, "finite number"),
    ({"repetition_penalty": float("inf")}, "finite number"), ({"top_p": "0.5"}, "top_p must be a finite"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\], got 0"), ({"stop_token_ids": 5}, "list of token ids, got 5"),
    ({"stop": [""]}, "stop must be non-empty"), ({"bad_words": [""]}, "bad_words must be non-empty"),
    ({"stop": 5}, "stop must be a string or a list of strings"),
])
def test_sampling_params_name_a_bad_value(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


def test_sampling_params_take_vllm_optionals():
    params = SamplingParams(stop=None, stop_token_ids=None, bad_words=None)
    assert params.stop == [] and params.stop_token_ids == [] and params.bad_words == []
    assert SamplingParams.from_dict({"stop": None, "bad_words": "x"}).bad_words == ["x"]
    # Negative seeds are valid (vLLM's int64 range) and reproducible.
    seqs = [make_seq(temperature=1.0, seed=-3) for _ in range(2)]
    draws = [[sample_one(FOUR, seq).token_id for _ in range(20)] for seq in seqs]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_rows_left_without_tokens_get_no_token_and_spare_the_batch():
    """bad_words against allowed_token_ids (or a grammar) can mask a whole row: the sampler must not crash
    (top-p over NaNs) nor invent a token; the other rows are sampled as usual."""
    dead = [make_seq(temperature=t, top_p=0.8, allowed_token_ids=[3], bad_words_ids=[[3]]) for t in (0, 1)]
    healthy = make_seq(temperature=1.0, top_p=0.8, seed=0)
    tokens = Sampler()(np.array([PEAKED] * 3, dtype=np.float32), [*dead, healthy])
    assert [t.token_id for t in tokens[:2]] == [NO_TOKEN, NO_TOKEN]
    assert tokens[2].token_id == sample_one(PEAKED, make_seq(temperature=1.0, top_p=0.8, seed=0)).token_id


@pytest.mark.parametrize(("bias", "message"), [
    ({"x": 1.0}, "not a token id"), ({3: "high"}, "not a token id"), ({-1: 1.0}, "token id >= 0"),
    ({3: 101.0}, r"\[-100, 100\]"), ([3, 1.0], "must map token ids"),
])
def test_logit_bias_rejects_bad_entries(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict({"logit_bias": bias})


def test_min_tokens_masks_eos_until_reached():
    logits = [0, 0, 0, 0, 0, 0, 1.0, 9.0]
    assert sample_one(logits, make_seq(temperature=0.0, min_tokens=2, output=[1])).token_id == 6
    assert sample_one(logits, make_seq(temperature=0.0, min_tokens=2, output=[1, 1])).token_id == EOS


def test_argmax_only_when_nothing_edits_or_reports_the_logits():
    assert argmax_only(make_seq(temperature=0.0))
    assert argmax_only(make_seq(temperature=0.0, min_tokens=1, output=[1]))
    edits = ({"temperature": 1.0}, {"logprobs": 0}, {"repetition_penalty": 1.2}, {"presence_penalty": 0.5},
             {"frequency_penalty": 0.5}, {"min_tokens": 1}, {"bad_words_ids": [[3]]},
             {"logit_bias": {3: 1.0}}, {"allowed_token_ids": [3]})
    for params in edits:
        assert not argmax_only(make_seq(**{"temperature": 0.0, **params})), params
    forced = make_seq(temperature=0.0)
    forced.forced_token_id = 5
    assert not argmax_only(forced)


def test_forced_token_wins():
    seq = make_seq(temperature=1.0, logprobs=1)
    seq.forced_token_id = 5
    result = sample_one(PEAKED, seq)  # raw logprobs: what the model thought of it
    assert result.token_id == 5 and result.logprob == pytest.approx(log_softmax(np.array(PEAKED))[5])
    processed = Sampler("processed_logprobs")(np.array([PEAKED], dtype=np.float32), [seq])[0]
    assert processed.token_id == 5 and processed.logprob == 0.0


def test_seeded_draws_do_not_depend_on_the_batch():
    def run(batch_extra: int) -> list[int]:
        seq = make_seq(seed=1234, temperature=1.0)
        others = [make_seq(seed=None, temperature=1.0, request_id=f"o{i}") for i in range(batch_extra)]
        tokens = []
        for _ in range(20):
            logits = np.tile(np.array(PEAKED, dtype=np.float32), (1 + batch_extra, 1))
            batch = others[: batch_extra // 2] + [seq] + others[batch_extra // 2 :]
            tokens.append(Sampler()(logits, batch)[batch_extra // 2].token_id)
        return tokens

    alone = run(0)
    assert run(5) == alone and run(2) == alone
    other_seed = [sample_one(PEAKED, make_seq(seed=99, temperature=1.0)).token_id for _ in range(20)]
    assert other_seed != alone
    sibling = make_seq(seed=1234, temperature=1.0, index=1)  # n > 1: each completion draws differently
    assert [sample_one(PEAKED, sibling).token_id for _ in range(20)] != alone


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.exp(x).sum())


def test_logprobs_are_log_softmax_of_the_logits_logprobs_mode_names():
    """raw (the default, as vLLM V1 and FastDeploy): the model's own distribution, whatever the sampling
    did; processed: the one the token was drawn from (temperature, top-k here); *_logits: the values."""
    logits = np.array(PEAKED, dtype=np.float32)
    greedy = sample_one(logits, make_seq(temperature=0.0, logprobs=3))
    assert greedy.token_id == 0 and [t for t, _ in greedy.top_logprobs] == [0, 1, 2]
    assert greedy.logprob == pytest.approx(log_softmax(logits)[0], abs=1e-5)
    assert [lp for _, lp in greedy.top_logprobs] == pytest.approx(list(log_softmax(logits)[:3]), abs=1e-5)
    assert sample_one(logits, make_seq(temperature=0.0)).logprob is None

    warm = {"temperature": 2.0, "top_k": 2, "seed": 3, "logprobs": 2}
    processed = np.where(np.arange(V) < 2, logits / 2.0, -np.inf)
    expected = {"raw_logprobs": log_softmax(logits), "processed_logprobs": log_softmax(processed),
                "raw_logits": logits, "processed_logits": processed}
    for mode, values in expected.items():
        token = Sampler(mode)(logits[None].copy(), [make_seq(**warm)])[0]
        assert token.logprob == pytest.approx(values[token.token_id], abs=1e-5), mode
        assert [lp for _, lp in token.top_logprobs] == pytest.approx(list(values[:2]), abs=1e-5), mode
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        Sampler("logits")


def test_min_p_comes_before_top_p_as_in_vllm():
    """vLLM and FastDeploy apply min-p first; top-p then measures the mass of what min-p left. Min-p 0.25
    drops token 3 (0.1 < 0.25 * 0.5), leaving token 0 with 0.56 of the mass: top_p 0.55 keeps it alone."""
    probs = list(np.log([0.5, 0.25, 0.15, 0.1, 1e-9, 1e-9, 1e-9, 1e-9]))
    assert set(draw_counts(probs, temperature=1.0, min_p=0.25, top_p=0.55)) == {0}
    assert set(draw_counts(probs, temperature=1.0, top_p=0.55)) == {0, 1}


def test_prompt_token_rank_counts_ties_as_vllm():
    """vLLM's rank: how many tokens have a logprob at least the token's (a tie for the top is rank 2)."""
    logits = np.array([[1.0, 1.0, 0.5, 0, 0, 0, 0, 0]] * 3, dtype=np.float32)
    scored = score_prompt_rows(np.arange(3), np.array([0, 1, 2]), 0, lambda rows: logits[rows])
    assert [s.rank for s in scored] == [2, 2, 3]


def test_seed_minus_one_means_no_seed():
    """vLLM takes seed -1 as "no seed" (clients send it for "random"): every such request used to draw the
    same tokens."""
    assert SamplingParams(seed=-1).seed is None and SamplingParams.from_dict({"seed": "-1"}).seed is None
    assert SamplingParams(seed=-3).seed == -3


def test_json_null_leaves_the_default():
    """A null in sampling_parameters means "not given": skip_special_tokens null used to turn it off."""
    params = SamplingParams.from_dict({"skip_special_tokens": None, "n": None, "min_tokens": None,
                                       "temperature": None})
    assert params.skip_special_tokens is True and params.n == 1 and params.min_tokens == 0
    assert params.temperature is None


def test_extreme_repetition_penalty_with_a_low_temperature_keeps_masks():
    """Token 3's logit divided by a 1e-300 penalty is float32's max; over temperature 0.5 it overflowed to
    inf, the softmax gave NaNs and the draw returned token 0, a bad word."""
    logits = [0, 0, 0, 2.0, 1.0, 0, 0, 0]
    seq = make_seq(prompt=(3,), temperature=0.5, repetition_penalty=1e-300, bad_words_ids=[(0,)], seed=0)
    assert sample_one(logits, seq).token_id == 3
