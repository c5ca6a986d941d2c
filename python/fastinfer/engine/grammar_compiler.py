"""Compiles structured-output constraints against the model's tokenizer with llguidance, off the engine loop.

llguidance needs the tokenizer's vocabulary as bytes; both kinds of fastinfer tokenizer (a Hugging Face
``tokenizer.json`` and the one rebuilt from a GGUF file's metadata, loading/gguf_tokenizer.py) are a
``tokenizers.Tokenizer`` underneath, whose JSON form llguidance reads directly (byte-level BPE and SentencePiece's
``<0xXX>`` byte fallback alike). The mask covers the model's vocabulary: ids the tokenizer does not have (a padded
embedding) are never allowed.

Compiling builds the grammar's lexer and parser over the token trie: about a millisecond for a typical JSON schema
on the default model, up to a second for a very large grammar (and 0.25 s once, for the tokenizer). It runs in a
worker thread (llguidance releases the GIL while it builds), so the engine keeps stepping the other requests; a
request waits in the scheduler until its grammar is ready. Compiled grammars are kept by their llguidance text
(which holds the spec and its options), least recently used dropped first.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .structured_outputs import StructuredOutputsParams

CACHE_SIZE = 256  # compiled grammars kept


class GrammarCompiler:
    """Compiled grammars for one tokenizer.

    Parameters
    ----------
    tokenizer : a fastinfer Tokenizer (anything whose ``backend`` is a ``tokenizers.Tokenizer``)
    vocab_size : width of the model's logits; the masks have one bit per id in it
    eos_token_ids : the ids that end generation (allowed where the grammar may end)
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise ValueError("structured_outputs: needs a tokenizer backed by Hugging Face tokenizers "
                             f"(got {type(tokenizer).__name__})")
        if not eos_token_ids:
            raise ValueError("structured_outputs: the tokenizer has no end-of-sequence token to end a grammar with")
        self._backend = backend
        self.vocab_size = max(vocab_size, backend.get_vocab_size(with_added_tokens=True))
        self.eos_token_ids = list(eos_token_ids)
        self._lock = threading.Lock()  # guards _cache and _tokenizer
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._tokenizer = None  # llguidance.LLTokenizer, built on first use (in the worker)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastinfer-grammar")

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar (an llguidance matcher in its start state, never advanced itself)."""
        key = params.llguidance_grammar
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, key)
            self._cache[key] = future
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return future

    def llg_tokenizer(self):
        """The llguidance tokenizer (built once; about 0.25 s for a 49k vocabulary)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                backend = copy.copy(self._backend)  # to_str() must not carry padding or truncation settings
                backend.no_padding()
                backend.no_truncation()
                self._tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                         eos_token=self.eos_token_ids)
            return self._tokenizer

    def _compile(self, grammar: str):
        import llguidance

        matcher = llguidance.LLMatcher(self.llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs: the grammar does not compile for this tokenizer: "
                             f"{matcher.get_error()[:2000]}")
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
