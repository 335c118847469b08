"""A sequence's output text, grown by one token at a time.

Decoding the whole output again at every step costs a sequence time in its length at every step, so a
batch of long outputs spends more of each step in the tokenizer than in the model. The fast tokenizers'
`DecodeStream` (the `tokenizers` package, under every transformers fast tokenizer) turns one more token
into the text it completes, holding back a partial UTF-8 character until the bytes that complete it
arrive. A finished sequence's text is one whole decode, so it is exactly
`tokenizer.decode(output, skip_special_tokens=True)`. A tokenizer without a fast backend decodes the
whole output each time.
"""
from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class OutputText:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.text = ""  # the output's text so far

    def add(self, output_token_ids: list[int]) -> int:
        """Take the output's last token (`output_token_ids` is the whole output); returns how many
        characters of `text` are new."""
        before = len(self.text)
        if self.tokenizer is None:
            return 0
        if self.stream is None:
            self.text = self.tokenizer.decode(output_token_ids, skip_special_tokens=True)
            return max(len(self.text) - before, 0)
        piece = self.stream.step(self.backend, output_token_ids[-1])
        if piece:
            self.text += piece
        return len(self.text) - before

    def finish(self, output_token_ids: list[int]) -> None:
        """The final text: the whole output decoded once (a held-back partial character included)."""
        if self.tokenizer is not None:
            self.text = self.tokenizer.decode(output_token_ids, skip_special_tokens=True)
