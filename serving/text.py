"""Token ids to text as they arrive, cut at the first stop string.

    text = StopText(tokenizer, stops=["\\n\\n"])
    for token in handle.tokens():
        piece = text.add(token)      # new text safe to send ("" while it may still become a stop string)
        if text.stopped:             # a stop string appeared: the text ends before it; cancel the request
            break
    piece = text.finish()            # whatever was held back, once no more tokens come

Decoding is incremental, as text-generation-inference and vLLM do it: each token decodes a short window of the
ids before it (so a tokenizer that merges spaces or bytes across tokens still comes out right) rather than every id
again, and text that ends in an incomplete UTF-8 character waits for the rest of it. The pieces add up to the text
of all ids decoded at once. Text that could still be the beginning of a stop string is held back until it cannot
be, so no part of a stop string is ever sent.
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"  # what a decoder makes of a UTF-8 character cut in the middle
WINDOW = 5  # ids decoded before the new ones, for tokenizers whose text of a token depends on its neighbours


class StopText:
    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix_at = 0  # the window's start in ids
        self.read_at = 0  # ids up to here are in self.text
        self.text = ""  # the text decoded so far (up to read_at)
        self.sent = 0  # characters of self.text already given out
        self.stopped = False  # a stop string was found; self.text ends before it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one new token id; return the text that is now safe to send."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_at : self.read_at])
        after = self._decode(self.ids[self.prefix_at :])
        if after.endswith(INCOMPLETE) or len(after) <= len(before):
            return ""  # the rest of a character is still to come (or the token adds no text)
        self.text += after[len(before) :]
        self.prefix_at, self.read_at = max(self.read_at, len(self.ids) - WINDOW), len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: the text held back, as far as it goes."""
        if not self.stopped and self.read_at < len(self.ids):  # ids that end in a character never completed
            before = self._decode(self.ids[self.prefix_at : self.read_at])
            self.text += self._decode(self.ids[self.prefix_at :])[len(before) :]  # as decoding them all shows it
            self.read_at = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # The earliest stop string that starts in the text not yet sent (text sent never holds a stop's start).
        found = [at for stop in self.stops if (at := self.text.find(stop, self.sent)) >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
            final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def _held_back(self) -> int:
        """How many trailing characters might still grow into a stop string."""
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text) - self.sent), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held
