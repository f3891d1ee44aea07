"""The model's tokenizer and chat template, loaded from a Hugging Face directory (tokenizer.json +
tokenizer_config.json) or from a GGUF file's metadata. The daemon tokenizes; workers only need eos ids.

Thread-safety: `Tokenizer` is immutable after loading and its methods may run in a thread pool (the
daemon keeps tokenization off its event loop). `IncrementalDetokenizer` objects are per request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from shared.chat import ChatTemplate, Message
from shared.detokenizer import IncrementalDetokenizer
from shared.gguf_tokenizer import load_gguf_vocab
from shared.model_spec import load_model_spec, resolve_gguf_file
from shared.tokenize_cache import SegmentEncoder, encode_ids


class Tokenizer:
    """encode / decode / chat template / eos ids for one model."""

    def __init__(
        self,
        backend: Backend,
        *,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: Sequence[int],
    ) -> None:
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self._chat = (
            ChatTemplate(chat_template, bos_token=bos_token or "", eos_token=eos_token or "")
            if chat_template
            else None
        )

    @property
    def backend(self) -> Backend:
        """The `tokenizers.Tokenizer` underneath (the grammar engine builds its vocabulary table from it)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, with the special tokens the model adds to every prompt (e.g. BOS)."""
        return encode_ids(self._backend, text, add_special_tokens=True)

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat prompt. No extra BOS: the template writes its own."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return encode_ids(self._backend, text, add_special_tokens=False)

    def segment_encoder(self, max_bytes: int) -> tuple[SegmentEncoder | None, str]:
        """A new cache-aware encoder over this tokenizer whose ids equal `encode` (add_special_tokens=True)
        and `encode_chat`'s tokenization of the rendered text (False); (None, why) when this tokenizer's
        pieces between special tokens are not provably independent. Raises ValueError if max_bytes <= 0."""
        return SegmentEncoder.create(self._backend, max_bytes)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation (and the tools it may call, for templates that show them).
        Raises ValueError if the model has no chat template or the template rejects the messages."""
        if self._chat is None:
            raise ValueError("this model has no chat template")
        return self._chat.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens (BOS, EOS, chat markers) left out."""
        return self._backend.decode(list(token_ids), skip_special_tokens=True)

    def decode_with_special(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids` with special tokens written out."""
        return self._backend.decode(list(token_ids), skip_special_tokens=False)

    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one request's generated tokens."""
        return IncrementalDetokenizer(self.decode, prompt_ids)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load from a Hugging Face directory (tokenizer.json required) or a GGUF file / a directory holding
    one. Raises ValueError if neither is found."""
    p = Path(path)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return _from_hf_dir(p)
    vocab = load_gguf_vocab(resolve_gguf_file(p))
    return Tokenizer(
        vocab.backend,
        chat_template=vocab.chat_template,
        bos_token=vocab.bos_token,
        eos_token=vocab.eos_token,
        eos_token_ids=vocab.eos_token_ids,
    )


def _from_hf_dir(model_dir: Path) -> Tokenizer:
    backend = Backend.from_file(str(model_dir / "tokenizer.json"))
    config: dict[str, Any] = {}
    if (model_dir / "tokenizer_config.json").is_file():
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    bos = _token_text(config.get("bos_token"))
    eos = _token_text(config.get("eos_token"))
    eos_ids: list[int] = []
    if eos is not None and backend.token_to_id(eos) is not None:
        eos_ids.append(backend.token_to_id(eos))
    if (model_dir / "config.json").is_file():
        eos_ids.extend(load_model_spec(model_dir).eos_token_ids)
    return Tokenizer(
        backend,
        chat_template=_hf_chat_template(model_dir, config),
        bos_token=bos,
        eos_token=eos,
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
    )


def _hf_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
    # transformers >= 4.43 may write the template to its own file instead of tokenizer_config.json
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one serves chat
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value
