"""A character-level tokenizer for the embedded task (no downloads)."""

import torch


class CharTokenizer:
    """Maps a fixed alphabet to ids. Id 0 is padding, id 1 is end-of-sequence.

    The vocabulary is padded to a multiple of `pad_vocab_to` so that it divides any
    tensor-parallel size we test (megatron splits the output layer by vocabulary)."""

    pad_id = 0
    eos_id = 1
    chat_template = None  # a character vocabulary has no chat format

    def __init__(self, alphabet: str, pad_vocab_to: int = 16):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"tokenizer alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._to_id = {ch: i + 2 for i, ch in enumerate(alphabet)}
        used = len(alphabet) + 2
        self.vocab_size = -(-used // pad_vocab_to) * pad_vocab_to

    def encode(self, text: str) -> list[int]:
        try:
            return [self._to_id[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def decode(self, ids) -> str:
        """Decode up to (not including) the first EOS or padding token."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chars = []
        for i in ids:
            if i in (self.pad_id, self.eos_id):
                break
            if i - 2 < len(self.alphabet):
                chars.append(self.alphabet[i - 2])
        return "".join(chars)
