"""Per-request generation settings (vLLM's names, meanings and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .structured_outputs import StructuredOutputsParams

_EPS = 1e-5  # temperatures below this are greedy
# Bounds on what one request may ask for. The engine is one loop serving every request, so a request's own cost must
# stay bounded: each of its n sequences is built (prompt copy, generator) when it is queued, and every stop string and
# stop token id is checked after each of its tokens.
MAX_N = 1024  # sequences per request
MAX_STOP = 256  # stop strings per request
MAX_STOP_TOKEN_IDS = 1024  # stop token ids per request
MAX_LOGIT_BIAS = 1 << 16  # logit_bias entries and allowed_token_ids per request (a large vocabulary's size)
LOGIT_BIAS_RANGE = 100.0  # |bias| bound (OpenAI's): +-100 already dwarfs any model's logit differences
# torch.Generator.manual_seed takes any int in [-2**63, 2**64): sequence i of a request is seeded with seed + i.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops. Invalid values raise ValueError naming the field."""

    n: int = 1  # output sequences per request (each sampled independently from the same prompt)
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to >= top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token); 0 = off
    seed: int | None = None  # per-request random seed (sequence i uses seed + i); None = engine generator
    stop: str | list[str] | None = None  # strings that end generation in the output text (stored as a list)
    stop_token_ids: list[int] | None = None  # token ids that end generation (kept in token_ids)
    ignore_eos: bool = False  # keep generating after the tokenizer's end-of-sequence token
    max_tokens: int | None = 16  # most output tokens; None = up to the model length
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    logprobs: int | None = None  # top-k log-probabilities to return per sampled token (plus the sampled one)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence of each token in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt+output tokens
    skip_special_tokens: bool = True  # leave special tokens out of the output text
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text
    structured_outputs: StructuredOutputsParams | None = None  # the output must match this schema / regex / grammar
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled (None = all)
    prompt_logprobs: int | None = None  # top-k log-probabilities per prompt token (plus the prompt token itself)

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            value = repr(getattr(self, name))
            raise ValueError(f"{name} {rule}, got {value if len(value) <= 80 else value[:77] + '...'}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def real(name: str) -> float:
            """The field as a finite float (ints too big for a float fail here, not later inside torch)."""
            v = getattr(self, name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                try:
                    v = float(v)
                except OverflowError:
                    pass
                else:
                    if math.isfinite(v):
                        setattr(self, name, v)
                        return v
            fail(name, "must be a finite number")

        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            fail("n", f"must be an int in [1, {MAX_N}]")
        if not real("temperature") >= 0.0:
            fail("temperature", "must be >= 0")
        if not 0.0 < real("top_p") <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "must be -1, 0 (off) or >= 1")
        if not 0.0 <= real("min_p") <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1)):
            fail("seed", f"must be None or an int in [-2**63, 2**64 - n] (n={self.n}: sequence i uses seed + i)")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "must be an int >= 1 or None")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an int >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            fail("logprobs", "must be an int >= 0 or None")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= real(name) <= 2.0:
                fail(name, "must be in [-2, 2]")
        if not 0.0 < real("repetition_penalty") <= 1e6:
            fail("repetition_penalty", "must be in (0, 1e6]")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a bool")
        if self.stop is None:
            stops: list[str] = []
        elif isinstance(self.stop, str):
            stops = [self.stop]
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            stops = list(self.stop)
        else:
            fail("stop", "must be a str, a list of str or None")
        if any(not s for s in stops):
            fail("stop", "must not contain empty strings")
        if len(stops) > MAX_STOP:
            fail("stop", f"must hold at most {MAX_STOP} strings")
        self.stop = stops
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "must be a list of non-negative ints")
        elif len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            fail("stop_token_ids", f"must hold at most {MAX_STOP_TOKEN_IDS} ids")
        else:
            self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self._check_token_constraints(fail, is_int)

    def _check_token_constraints(self, fail, is_int) -> None:
        """structured_outputs, logit_bias, allowed_token_ids, prompt_logprobs (ids against the vocabulary: the
        engine, which knows it)."""
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            fail("structured_outputs", "must be a StructuredOutputsParams (or a dict of its fields) or None")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                fail("logit_bias", f"must be a dict of token id -> bias with at most {MAX_LOGIT_BIAS} entries")
            bias = {}
            for token, value in self.logit_bias.items():
                if not is_int(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r:.40}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or abs(value) > LOGIT_BIAS_RANGE:
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r:.40} "
                                     f"for token {token}")
                bias[token] = float(value)
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(is_int(t) and t >= 0 for t in ids):
                fail("allowed_token_ids", "must be a non-empty list of token ids (ints >= 0) or None")
            if len(ids) > MAX_LOGIT_BIAS:
                fail("allowed_token_ids", f"must hold at most {MAX_LOGIT_BIAS} ids")
            self.allowed_token_ids = list(dict.fromkeys(ids))
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            fail("prompt_logprobs", "must be an int >= 0 or None")

    @property
    def greedy(self) -> bool:
        """True when the temperature picks the argmax."""
        return self.temperature < _EPS

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming the field when a token id this request names is outside [0, vocab_size)."""
        for name, given in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or ()),
                            ("allowed_token_ids", self.allowed_token_ids or ())):
            bad = next((t for t in given if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name}: {bad} is out of the vocabulary [0, {vocab_size})")

    @property
    def constrains_tokens(self) -> bool:
        """True when a grammar, allowed_token_ids or logit_bias changes this request's logits."""
        return self.structured_outputs is not None or self.allowed_token_ids is not None or bool(self.logit_bias)

    @property
    def has_penalties(self) -> bool:
        """True when any of the three penalties changes the logits."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
