"""`Generator`: prompt -> tokens -> prefill -> decode loop with the KV cache -> streamed text.

Prompts longer than the model's context are refused (not truncated: silently dropping the start of a prompt
changes its meaning); when prompt + max_new_tokens exceeds the context, generation stops at the context limit
with `stop_reason == "context"`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pbs2p_edge.errors import Pbs2pError
from pbs2p_edge.runtime.bundle import load_bundle
from pbs2p_edge.runtime.sampling import Sampler, SamplingConfig
from pbs2p_edge.runtime.session import DEFAULT_PREFILL_CHUNK, DecoderSession
from pbs2p_edge.runtime.text import ChatTemplate, IncrementalDecoder, check_utf8, load_tokenizer


@dataclass
class GenerationResult:
    """Filled in while a generation runs, so a caller interrupted half-way still has what was produced."""

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str | None = None  # "eos", "max_new_tokens", "context", or None while running / interrupted
    prefill_seconds: float = 0.0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


class Generation:
    """An iterator over text pieces as they are generated; `.result` is updated after every token."""

    def __init__(
        self,
        generator: Generator,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        stop_ids: set[int],
    ) -> None:
        self.result = GenerationResult(prompt_token_ids=list(prompt_ids))
        self._pieces = self._run(generator, max_new_tokens, Sampler(sampling), stop_ids)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(
        self, generator: Generator, max_new_tokens: int, sampler: Sampler, stop_ids: set[int]
    ) -> Iterator[str]:
        session, result = generator.session, self.result
        decoder = IncrementalDecoder(generator.tokenizer)
        history = list(result.prompt_token_ids)
        session.reset()
        start = time.perf_counter()
        logits = session.prefill(result.prompt_token_ids)
        result.prefill_seconds = time.perf_counter() - start
        decode_start = None
        while True:
            token = sampler.choose(logits, history)
            if decode_start is None:
                result.time_to_first_token = time.perf_counter() - start
                decode_start = time.perf_counter()
            if token in stop_ids:
                result.stop_reason = "eos"
                break
            result.token_ids.append(token)
            history.append(token)
            piece = decoder.push(token)
            result.text = decoder.text
            if piece:
                yield piece
            if len(result.token_ids) >= max_new_tokens:
                result.stop_reason = "max_new_tokens"
                break
            if len(history) >= session.context_length:  # prompt + answer fill the context
                result.stop_reason = "context"
                break
            logits = session.forward([token])
            result.decode_seconds = time.perf_counter() - decode_start
        tail = decoder.flush()
        result.text = decoder.text
        if tail:
            yield tail


class Generator:
    """Load a bundle once, then generate from prompts: `Generator("bundle/").generate("Hello", 32).text`.

    One generation at a time per Generator: they share the session's KV cache. For concurrent generations,
    give each thread its own `fork()`: forks share the loaded model and have their own cache.
    `ops_library` and `verify_hash` are load_bundle's (runtime/bundle.py).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        threads: int | None = None,
        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
        *,
        ops_library: str | os.PathLike | None = None,
        verify_hash: bool = True,
    ) -> None:
        self.bundle = load_bundle(bundle_dir, ops_library=ops_library, verify_hash=verify_hash)
        self.tokenizer = load_tokenizer(self.bundle.tokenizer_path)
        self.chat_template = ChatTemplate.from_bundle(self.bundle.path)
        self.session = DecoderSession(self.bundle, threads=threads, prefill_chunk=prefill_chunk)

    def fork(self) -> Generator:
        """A Generator over the same loaded model (one onnxruntime session) with its own KV cache."""
        other = copy.copy(self)
        other.session = self.session.fork()
        return other

    @property
    def context_length(self) -> int:
        return self.bundle.context_length

    def stop_ids(self, chat: bool) -> set[int]:
        ids = set(self.bundle.eos_token_ids)
        if (
            chat
        ):  # a chat turn ends at <|im_end|> (or the template's eos token) even if the manifest says otherwise
            names = ["<|im_end|>", self.chat_template.eos_token if self.chat_template else ""]
            ids |= {i for i in (self.tokenizer.token_to_id(n) for n in names if n) if i is not None}
        return ids

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of the prompt (through the chat template when `chat`); refuses empty or over-long prompts."""
        check_utf8(prompt)
        if system is not None:
            check_utf8(system, "system message")
        if not prompt.strip():
            raise Pbs2pError("the prompt is empty")
        if chat:
            if self.chat_template is None:
                raise Pbs2pError(f"bundle {self.bundle.path} has no chat template; drop --chat")
            ids = self.tokenizer.encode(
                self.chat_template.render(prompt, system), add_special_tokens=False
            ).ids
        else:
            ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise Pbs2pError("the prompt tokenizes to nothing")
        if len(ids) >= self.context_length:
            raise Pbs2pError(
                f"the prompt is {len(ids)} tokens; the model's context is {self.context_length} tokens "
                "(including the answer): shorten it"
            )
        return ids

    def start(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        *,
        chat: bool = False,
        system: str | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
    ) -> Generation:
        """Begin a generation; iterate the returned object for text pieces. `prompt` may be token ids."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise Pbs2pError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(prompt, str):
            ids = self.encode(prompt, chat=chat, system=system)
        else:
            ids = [int(i) for i in prompt]
            if not ids or len(ids) >= self.context_length:
                raise Pbs2pError(f"prompt must be 1 to {self.context_length - 1} token ids, got {len(ids)}")
        return Generation(self, ids, max_new_tokens, sampling, self.stop_ids(chat))

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, **options) -> Iterator[str]:
        """Text pieces as they are generated (see `start` for the options)."""
        return iter(self.start(prompt, max_new_tokens, **options))

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, **options) -> GenerationResult:
        """Generate to the end (EOS, max_new_tokens or the context limit) and return the result."""
        generation = self.start(prompt, max_new_tokens, **options)
        for _ in generation:
            pass
        return generation.result
