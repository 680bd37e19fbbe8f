"""Streamed text from token ids, a step at a time.

Decoding the whole sequence at every step costs O(n) per step, O(n^2) per request: at 2,048 tokens a
step's decode alone would take longer than a fused verify step on the GPU. Like vLLM's incremental
detokenizer, each step decodes only a short window: a few tokens already shown (so a tokenizer that
treats a sequence's first token specially, such as SentencePiece dropping its leading space, treats
the window's first token the same way in both decodes) plus the new ones; the delta is the window's
text past the shown tokens' text.
"""
from __future__ import annotations

from typing import Sequence

CONTEXT_TOKENS = 5  # shown tokens decoded again in front of the new ones


class IncrementalText:
    """The text of a growing token sequence as deltas whose concatenation is the whole decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the deltas so far
        self._start = 0  # where the decoded window starts
        self._shown = 0  # ids whose text is in self.text

    def add(self, new: Sequence[int], finished: bool) -> str:
        """The text the new ids add ("" while they end inside a multi-byte character, which the next
        step completes; all of it once finished)."""
        self.ids += new
        shown = self._decode(self.ids[self._start:self._shown])
        window = self._decode(self.ids[self._start:])
        if window.endswith("\ufffd") and not finished:
            return ""
        if window.startswith(shown):
            delta = window[len(shown):]
        else:  # the window decodes differently from its shown part (a merge across the boundary)
            delta = self._decode(self.ids)[len(self.text):]
        self.text += delta
        self._shown = len(self.ids)
        self._start = max(self._shown - CONTEXT_TOKENS, 0)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
