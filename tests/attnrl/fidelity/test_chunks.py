"""Chunk boundaries: sentence ends where there are >= 2 sentences (merged to at most K),
else equal token chunks; every chunk non-empty, bounds run 0..T."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnrl.fidelity.chunks import chunk_bounds, chunk_index, sentence_bounds, token_bounds


@given(st.integers(1, 300), st.integers(2, 12))
def test_token_bounds_cover_the_response_in_nonempty_nearly_equal_chunks(length, k):
    bounds = token_bounds(length, k)
    assert bounds[0] == 0 and bounds[-1] == length
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert len(sizes) == min(length, k) and min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1


@given(st.lists(st.integers(1, 199), min_size=1, max_size=40, unique=True), st.integers(2, 8))
def test_sentence_bounds_keep_only_sentence_ends_and_at_most_k_chunks(ends, k):
    length = 200
    bounds = sentence_bounds(sorted(ends) + [length], length, k)
    assert bounds[0] == 0 and bounds[-1] == length
    assert bounds == sorted(set(bounds))                      # strictly increasing
    assert len(bounds) - 1 == min(k, len(ends) + 1)
    assert set(bounds[1:-1]) <= set(ends)


def test_sentence_bounds_pick_the_ends_nearest_to_equal_cuts():
    ends = [5, 10, 48, 52, 90, 99]
    assert sentence_bounds(ends + [100], 100, 2) == [0, 48, 100]
    # cuts at 25, 50, 75: 10 (nearest to 25), 48 (ties 52 at distance 2: the earlier), 90
    assert sentence_bounds(ends + [100], 100, 4) == [0, 10, 48, 90, 100]


def test_auto_uses_sentences_when_there_are_two_else_tokens():
    two = ["The", " sum", " is", " 7", ".", " So", " 7", "."]
    bounds, how = chunk_bounds(two, 4)
    assert how == "sentence" and bounds == [0, 5, 8]
    one = ["7", " plus", " 3", " gives", " 10"]
    bounds, how = chunk_bounds(one, 4)
    assert how == "tokens" and bounds == [0, 1, 2, 4, 5]
    assert chunk_bounds(two, 4, "tokens") == (token_bounds(8, 4), "tokens")
    with pytest.raises(ValueError):
        chunk_bounds(two, 4, "paragraph")


def test_decimal_points_do_not_end_a_sentence():
    tokens = ["It", " is", " 3", ".", "5", " now", ".", " Done", "."]
    bounds, how = chunk_bounds(tokens, 4)
    assert how == "sentence" and bounds == [0, 7, 9]


def test_chunk_index_labels_every_token():
    assert chunk_index([0, 2, 3, 6]) == [0, 0, 1, 2, 2, 2]


def test_the_eos_token_joins_the_last_sentence(tiny_model_dir):
    """With a real tokenizer: the response's EOS token is part of its last chunk, never a
    chunk of its own."""
    from attnrl.fidelity.pipeline import token_texts
    from attnrl.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer("First add 3 and 4. That gives 7.", add_special_tokens=False)["input_ids"]
    ids = ids + [tokenizer.eos_token_id]
    bounds, how = chunk_bounds(token_texts(tokenizer, ids), 4)
    assert how == "sentence" and len(bounds) == 3 and bounds[-1] == len(ids)
    assert bounds[-1] - bounds[-2] > 1                 # the EOS rides with "That gives 7."
