"""Tokenizer, chat template and incremental detokenization, with the `tokenizers` package only.

Chat templates: a ChatML template (`<|im_start|>role\\n...<|im_end|>\\n`, SmolLM2's) is rendered natively, so chat
works on a device without jinja2; its default system message, when the template hard-codes one for conversations
that lack it, is read from the template text. Any other template is rendered with jinja2 when it is installed
(a sandboxed environment, as transformers does) and refused with a clear error otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pbs2p_edge.errors import Pbs2pError

# The newline inside the template's string literal is either a real newline or the two characters "\n".
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.DOTALL)


def check_utf8(text: str, what: str = "prompt") -> str:
    """Refuse text that is not valid Unicode (e.g. non-UTF-8 bytes that reached argv as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Pbs2pError(f"{what} is not valid UTF-8") from None
    return text


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise Pbs2pError(f"cannot read tokenizer {path}: {str(exc).strip().splitlines()[0]}") from None


def _template_from_config(bundle_dir: Path) -> tuple[str | None, dict[str, Any]]:
    config_path = bundle_dir / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Pbs2pError(f"{config_path} is not valid JSON ({exc})") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = bundle_dir / "chat_template.jinja"  # where transformers >= 4.50 saves it
    if not template and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    json_file = bundle_dir / "chat_template.json"
    if not template and json_file.is_file():
        template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
    return (template if isinstance(template, str) and template.strip() else None), config


def _special_token(config: dict[str, Any], key: str) -> str:
    value = config.get(key)
    if isinstance(value, dict):  # AddedToken serialised as a dict
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """Turns a user message (and optional system message) into the prompt text the model was tuned on."""

    def __init__(self, template: str, config: dict[str, Any]) -> None:
        self.template = template
        self.is_chatml = "<|im_start|>" in template and "<|im_end|>" in template
        match = _DEFAULT_SYSTEM.search(template)
        self.default_system = match.group(1).replace("\\n", "\n") if match else None
        self.bos_token = _special_token(config, "bos_token")
        self.eos_token = _special_token(config, "eos_token")

    @classmethod
    def from_bundle(cls, bundle_dir: Path) -> ChatTemplate | None:
        template, config = _template_from_config(bundle_dir)
        return cls(template, config) if template else None

    def render(self, user: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}
        ]
        if self.is_chatml:
            return self.render_chatml(messages)
        return self.render_jinja(messages)

    def render_chatml(self, messages: Sequence[dict[str, str]]) -> str:
        parts = []
        if messages[0]["role"] != "system" and self.default_system is not None:
            parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def render_jinja(self, messages: Sequence[dict[str, str]]) -> str:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise Pbs2pError(
                "this model's chat template is not ChatML and needs jinja2 (pip install jinja2), or drop --chat"
            ) from None

        def raise_exception(message: str) -> None:
            raise Pbs2pError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.template).render(
                messages=list(messages),
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Pbs2pError:
            raise
        except Exception as exc:
            raise Pbs2pError(f"cannot render the chat template: {exc}") from None


class IncrementalDecoder:
    """Text of a growing token sequence, emitted piece by piece; never splits a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte(s)
            return ""
        if not text.startswith(
            self._emitted
        ):  # the decoder revised earlier text (rare): emit only what is new
            common = 0
            while common < min(len(text), len(self._emitted)) and text[common] == self._emitted[common]:
                common += 1
            self._emitted = text[:common]
        piece = text[len(self._emitted) :]
        self._emitted = text
        return piece

    def flush(self) -> str:
        """Whatever was held back waiting for more bytes (decoded with replacement characters)."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        piece = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece

    @property
    def text(self) -> str:
        return self._emitted
