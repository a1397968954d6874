"""A sequence's text, decoded as its tokens arrive (`IncrementalText`), and the part of it that is
safe to show a reader while it grows (`TextStream`: the command's streaming and the server's).

Decoding the whole output again at every token costs time quadratic in its length; `IncrementalText`
decodes a short window instead. The window starts a few tokens before the new ones and the text of
those few is decoded with and without the new tokens: what the second adds is the new text, so a
tokenizer that renders a token differently at the start of a text (a leading space) or a character
split over several byte tokens still gives, token by token, exactly the text of the whole.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder shows for bytes of a character that has not come whole
MAX_CHARACTER_TOKENS = 4  # a UTF-8 character has at most 4 bytes: past that many tokens, it is not coming


class IncrementalText:
    """The text of a growing list of token ids.

    `update(ids)` takes the whole list so far (it only grows) and returns the text it adds; a
    trailing partial character is held back until the tokens that complete it come, or until
    `update(ids, final=True)`, or until 4 tokens have come without completing it (invalid bytes
    show as the replacement character then). `text` is everything returned so far.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self._start = 0  # the window's first token
        self._done = 0  # tokens whose text is in self.text

    def update(self, ids: list[int], final: bool = False) -> str:
        if len(ids) == self._done:
            return ""
        before = self.tokenizer.decode(ids[self._start:self._done])
        after = self.tokenizer.decode(ids[self._start:])
        if after.endswith(REPLACEMENT) and not final and len(ids) - self._done < MAX_CHARACTER_TOKENS:
            return ""  # a character not yet whole: wait for the tokens that complete it
        if after.startswith(before):
            new = after[len(before):]
        else:  # the window's text changed with the new tokens (a decoder that joins across tokens): the whole
            whole = self.tokenizer.decode(ids)
            new = whole[len(self.text):] if whole.startswith(self.text) else ""
        self.text += new
        self._start, self._done = self._done, len(ids)
        return new


def first_stop(text: str, stops: tuple[str, ...] | list[str], searched: int) -> int | None:
    """Where the first of the stop strings starts in text, looking only where one could end past
    `searched` (the text's length when it was last looked at); None if none is there."""
    found = [i for stop in stops if (i := text.find(stop, max(searched - len(stop) + 1, 0))) >= 0]
    return min(found) if found else None


class TextStream:
    """The new text of a completion that grows token by token, safe to print now.

    `update` gets the completion's whole text so far and returns what is past what it returned before,
    holding back a trailing replacement character (a multi-byte character whose other bytes have not
    come yet) and a tail that may be the start of a stop string (the engine cuts the text there if the
    rest follows), until the completion has finished.
    """

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.shown = ""

    def update(self, text: str, finished: bool = False) -> str:
        """The text to print now (possibly empty)."""
        end = len(text)
        if not finished:
            end = len(text.rstrip("\ufffd"))
            held = max((k for stop in self.stop for k in range(1, len(stop))
                        if text[:end].endswith(stop[:k])), default=0)
            end -= held
        if end <= len(self.shown) or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):end], text[:end]
        return new
