"""Incremental detokenization: token by token, the text of the whole, with a fraction of the decoding."""

import numpy as np
import pytest

from jaxpaged.engine.detokenize import IncrementalText, first_stop
from jaxpaged.models.tokenizer import Tokenizer


class CountingTokenizer:
    """A tokenizer that counts the tokens it was asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


def _grow(tokenizer, ids, final=True):
    text, pieces = IncrementalText(tokenizer), []
    for end in range(1, len(ids) + 1):
        pieces.append(text.update(ids[:end], final=final and end == len(ids)))
    return text, pieces


@pytest.mark.parametrize("seed", range(5))
def test_text_token_by_token_equals_the_whole_and_holds_back_partial_characters(seed):
    """Byte tokens split multi-byte characters: no piece ends inside one, and the pieces join to the
    text of the whole."""
    tokenizer = Tokenizer.byte_level()
    rng = np.random.default_rng(seed)
    words = ["naïve", "日本語", " café", "😀", " plain", "\n", "ß"]
    ids = tokenizer.encode("".join(rng.choice(words, 40)))
    text, pieces = _grow(tokenizer, ids)
    assert text.text == "".join(pieces) == tokenizer.decode(ids)
    assert not any(piece.endswith("\ufffd") for piece in pieces)
    assert any(piece == "" for piece in pieces[:-1]), "some character spans several tokens"


def test_a_partial_character_at_the_end_comes_out_only_when_final():
    tokenizer = Tokenizer.byte_level()
    ids = tokenizer.encode("ab😀")[:-1]  # the emoji's last byte missing
    text, pieces = _grow(tokenizer, ids, final=False)
    assert text.text == "ab"
    assert text.update(ids, final=True) == tokenizer.decode(ids)[2:]


def test_decoding_is_linear_in_the_output():
    """Each token decodes a window of a few tokens, not the whole output (quadratic)."""
    tokenizer = CountingTokenizer(Tokenizer.byte_level())
    ids = Tokenizer.byte_level().encode("plain ascii text " * 60)  # 1,020 tokens
    text, _ = _grow(tokenizer, ids)
    assert text.text == tokenizer.tokenizer.decode(ids)
    assert tokenizer.decoded < 4 * len(ids), tokenizer.decoded


def test_first_stop_finds_a_stop_string_that_straddles_what_was_searched():
    assert first_stop("hello world", ["lo w"], searched=5) == 3
    assert first_stop("hello world", ["wor", "lo"], searched=0) == 3
    assert first_stop("hello world", ["xyz"], searched=0) is None
    assert first_stop("hello world", ["he"], searched=11) is None, "found before: not searched again"


def test_bytes_that_never_make_a_character_are_not_held_back_for_ever():
    tokenizer = Tokenizer.byte_level()
    ids = [tokenizer.encode("é")[0]] * 12  # lead bytes only: invalid UTF-8
    text, pieces = _grow(tokenizer, ids, final=False)
    assert text.text and set(text.text) == {"\ufffd"}, "shown as replacement characters after a few tokens"
