"""A sequence's text grown token by token equals the whole decode, on the real models' tokenizers."""
import random

import pytest

from sparsedecode.engine.output_text import OutputText
from sparsedecode.models.loader import load_tokenizer

TEXT = "def f(x):\n    return x ** 2  # the square, 平方, carré 🙂\n" * 3


@pytest.mark.parametrize("model", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_text_grown_token_by_token_is_the_whole_decode(model):
    """Real text, special tokens (skipped) and random ids (partial UTF-8 characters included): after every
    token the text is a prefix of decoding the output so far (a partial character is held back, where the
    whole decode shows a replacement character), and after `finish` it is that decode."""
    tokenizer = load_tokenizer(model)
    rng = random.Random(0)
    outputs = [tokenizer.encode(TEXT, add_special_tokens=False),
               [tokenizer.eos_token_id] + tokenizer.encode(TEXT, add_special_tokens=False)[:20] + [tokenizer.eos_token_id]]
    outputs += [[rng.randrange(tokenizer.vocab_size) for _ in range(200)] for _ in range(5)]
    for ids in outputs:
        text, seen = OutputText(tokenizer), 0
        for i in range(len(ids)):
            new = text.add(ids[: i + 1])
            assert new == len(text.text) - seen and new >= 0
            seen = len(text.text)
            assert tokenizer.decode(ids[: i + 1], skip_special_tokens=True).startswith(text.text)
        text.finish(ids)
        assert text.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert OutputText(tokenizer).stream is not None  # the incremental path is the one tested


def test_no_tokenizer_gives_no_text():
    text = OutputText(None)
    assert text.add([1, 2, 3]) == 0 and text.text == ""
    text.finish([1, 2, 3])
    assert text.text == ""
