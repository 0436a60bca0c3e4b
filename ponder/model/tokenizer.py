"""Tokenizer: `tokenizers` for text <-> ids, jinja2 for the model's chat template.

Reads a folder with tokenizer.json and tokenizer_config.json (and optionally chat_template.jinja),
as written by `transformers` or shipped in a Hugging Face model folder.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    def __init__(self, folder: str, eos_token_ids: list[int] | None = None):
        self._tok = HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = json.load(open(config_path)) if os.path.exists(config_path) else {}
        template_path = os.path.join(folder, "chat_template.jinja")
        self.chat_template = (open(template_path).read() if os.path.exists(template_path)
                              else config.get("chat_template"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        eos = list(eos_token_ids or [])
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is not None and eos_id not in eos:
            eos.append(eos_id)
        self.eos_token_ids = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template = None

    def to_json(self) -> str:
        """The tokenizer.json it was read from (for llguidance)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                     **kwargs)


def _token_text(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _raise(message: str):
    raise ValueError(f"chat template error: {message}")
