"""A character-level tokenizer for the embedded task (no downloads), a Hugging Face one, and
the Tokenizer protocol both satisfy."""

from typing import Protocol, cast

import torch


class Tokenizer(Protocol):
    """What the trainers, engines and checkpoints use of a tokenizer (HFTokenizer also has
    apply_chat_template, for prompts in chat form when chat_template is set)."""

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def eos_ids(self) -> frozenset: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def chat_template(self) -> str | None: ...

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int] | torch.Tensor) -> str: ...

    def save_pretrained(self, directory: str) -> None: ...


class CharTokenizer:
    """Maps a fixed alphabet to ids. Id 0 is padding, id 1 is end-of-sequence.

    `save_pretrained` writes the same mapping as a Hugging Face tokenizer (tokenizer.json), so
    the built-in model's checkpoints carry their tokenizer and export like any other."""

    pad_id = 0
    eos_id = 1
    chat_template = None  # a character vocabulary has no chat format

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"tokenizer alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self._to_id = {ch: i + 2 for i, ch in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 2

    @property
    def eos_ids(self) -> frozenset:
        return frozenset({self.eos_id})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return [self._to_id[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def save_pretrained(self, directory: str) -> None:
        """tokenizer.json + tokenizer_config.json: one token per character, the same ids."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({"<pad>": self.pad_id, "</s>": self.eos_id, **self._to_id}, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        tok.decoder = decoders.Fuse()  # characters join without spaces
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(directory)

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


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json, or a SentencePiece model that
    transformers loads) behind the same interface as CharTokenizer, plus its chat template
    and every end-of-sequence id (Llama 3 has several: generation stops on any of them)."""

    def __init__(self, directory: str, extra_eos_ids=()):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:  # AutoTokenizer picks a class from config.json; a bare tokenizer.json needs the fast class
            self.tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception:
            try:
                self.tok = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
            except Exception as err:
                raise ValueError(f"{directory}: cannot load a tokenizer ({type(err).__name__}: {err})") from None
        eos = {self.tok.eos_token_id, *extra_eos_ids} - {None}
        if not eos:
            raise ValueError(f"{directory}: the tokenizer has no end-of-sequence token (eos_token)")
        self.eos_ids = frozenset(eos)
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else min(eos)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.tok)
        self.chat_template = self.tok.chat_template

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=add_special_tokens)
        except Exception as err:  # e.g. a character-level vocabulary without an unknown token
            raise ValueError(f"cannot tokenize {text[:40]!r} ({err})") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return list(
            self.tok.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        )

    def save_pretrained(self, directory: str) -> None:
        self.tok.save_pretrained(directory)

    def decode(self, ids) -> str:
        """Decode up to (not including) the first end-of-sequence or padding token."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        stop = next((i for i, t in enumerate(ids) if t in self.eos_ids or t == self.pad_id), len(ids))
        return cast(str, self.tok.decode(ids[:stop], skip_special_tokens=True))  # a str for one sequence
