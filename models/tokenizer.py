"""Text <-> token ids, and chat templates, for the models this project loads.

Built on the `tokenizers` library from either a GGUF file's vocabulary and merges (byte-level BPE,
as llama.cpp stores it) or a checkpoint directory's `tokenizer.json`. Chat templates are the
Jinja templates the model files carry, rendered the way Hugging Face renders them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers

# llama.cpp's pre-tokenizer names and the splits they stand for (the byte-level BPE of GPT-2,
# with every digit a token of its own for SmolLM).
_DIGIT_SPLITTING_PRE = {"smollm"}
_GPT2_PRE = {"gpt2", "default", "smollm", None}
_CONTROL_TOKEN = 3  # GGUF token type


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


class Tokenizer:
    """Encodes and decodes text; knows its BOS, EOS and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 chat_template: str | None, add_bos: bool = False):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (like <|im_start|>) stay whole."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] + ids) if self.add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}]) as the model's template writes it."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; run without --chat")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        special = lambda i: None if i is None else self.token(i)  # noqa: E731
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=special(self.bos_token_id) or "",
            eos_token=special(self.eos_token_ids[0]) if self.eos_token_ids else "",
        )

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """One token per byte (ids 0-255) and <|endoftext|> (id 256) as EOS: for training from scratch."""
        chars = _bytes_to_unicode()
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
        return cls(backend, bos_token_id=None, eos_token_ids=[256], chat_template=None)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> Tokenizer:
        """From the `tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE only)."""
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer {model!r}: only byte-level BPE ('gpt2') is supported")
        pre = fields.get("tokenizer.ggml.pre")
        if pre not in _GPT2_PRE:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")
        tokens = list(fields["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
        backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                                 if pre in _DIGIT_SPLITTING_PRE else byte_level)
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type") or [0] * len(tokens)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, types) if kind == _CONTROL_TOKEN])
        eos = fields.get("tokenizer.ggml.eos_token_id")
        return cls(backend, bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=[] if eos is None else [int(eos)], chat_template=fields.get("tokenizer.chat_template"),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_dir(cls, path: str) -> Tokenizer:
        """From a checkpoint directory: tokenizer.json, and tokenizer_config.json if present."""
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file} not found: the checkpoint has no tokenizer")
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        settings = {}
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
            with open(os.path.join(path, "tokenizer_config.json")) as f:
                settings = json.load(f)
        vocab = backend.get_vocab(with_added_tokens=True)

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return vocab.get(value) if isinstance(value, str) else value

        eos = token_id(settings.get("eos_token"))
        template = settings.get("chat_template")
        return cls(backend, bos_token_id=token_id(settings.get("bos_token")), eos_token_ids=[] if eos is None else [eos],
                   chat_template=template if isinstance(template, str) else None,
                   add_bos=bool(settings.get("add_bos_token", False)))

    def save(self, path: str) -> None:
        """Writes tokenizer.json and tokenizer_config.json into the directory `path`."""
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        token = lambda i: None if i is None else self.token(i)  # noqa: E731
        settings = {"bos_token": token(self.bos_token_id),
                    "eos_token": token(self.eos_token_ids[0]) if self.eos_token_ids else None,
                    "chat_template": self.chat_template, "add_bos_token": self.add_bos,
                    "tokenizer_class": "PreTrainedTokenizerFast"}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(settings, f, indent=2)
