"""One deployment's live state: health (recent failures, cooldown, Retry-After), load (in flight, this minute's
requests and tokens) and speed (latency, time to first token, tokens/s), as the routing strategies read it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .backend import Backend
from .config import DeploymentSpec

FAIL_WINDOW_S = 60.0  # allowed_fails counts failures within this window (LiteLLM: "per minute")
_EWMA = 0.3  # weight of the newest latency sample


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA * (new - old)


@dataclass(slots=True, eq=False)
class Deployment:
    spec: DeploymentSpec
    backend: Backend
    in_flight: int = 0  # attempts running now
    fail_times: deque = field(default_factory=deque)  # monotonic times of failures within FAIL_WINDOW_S
    cooldown_until: float = 0.0  # monotonic; no traffic before this
    not_before: float = 0.0  # monotonic; its own Retry-After asked for no traffic before this
    latency: float | None = None  # EWMA seconds of a whole non-streaming answer
    ttft: float | None = None  # EWMA seconds to the first streamed event
    tokens_per_s: float | None = None  # EWMA completion tokens per second of answer time
    minute: int = -1  # the minute (monotonic // 60) the usage counters below are for
    minute_requests: int = 0
    minute_tokens: int = 0
    # totals since start (reported in /router/status)
    requests: int = 0
    successes: int = 0
    failures: int = 0
    cooldowns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def price(self) -> float:
        """Dollars per prompt token plus per completion token: what cost-based routing sorts by."""
        return self.spec.input_cost_per_token + self.spec.output_cost_per_token

    def available(self, now: float) -> bool:
        """Not cooled down, not asked to wait (Retry-After) and under max_parallel_requests."""
        if now < self.cooldown_until or now < self.not_before:
            return False
        limit = self.spec.max_parallel_requests
        return limit is None or self.in_flight < limit

    def cooled_down(self, now: float) -> bool:
        return now < self.cooldown_until

    def _roll_minute(self, now: float) -> None:
        minute = int(now // 60)
        if minute != self.minute:
            self.minute, self.minute_requests, self.minute_tokens = minute, 0, 0

    def under_limits(self, now: float, tokens: int) -> bool:
        """This minute's requests and tokens leave room for one more request of ``tokens`` (rpm, tpm)."""
        self._roll_minute(now)
        rpm, tpm = self.spec.rpm, self.spec.tpm
        return ((rpm is None or self.minute_requests + 1 <= rpm)
                and (tpm is None or self.minute_tokens + tokens <= tpm))

    def usage_fraction(self, now: float) -> float:
        """How much of this minute's rpm/tpm is used (the larger), 0 without limits."""
        self._roll_minute(now)
        parts = [0.0]
        if self.spec.rpm:
            parts.append(self.minute_requests / self.spec.rpm)
        if self.spec.tpm:
            parts.append(self.minute_tokens / self.spec.tpm)
        return max(parts)

    def started(self, now: float) -> None:
        self._roll_minute(now)
        self.in_flight += 1
        self.requests += 1
        self.minute_requests += 1

    def finished(self) -> None:
        self.in_flight -= 1

    def succeeded(self, seconds: float, ttft: float | None, prompt_tokens: int, completion_tokens: int) -> float:
        """Record a success; returns its cost in dollars."""
        self.successes += 1
        if ttft is None:
            self.latency = _ewma(self.latency, seconds)
        else:
            self.ttft = _ewma(self.ttft, ttft)
        if completion_tokens > 0 and seconds > 0:
            self.tokens_per_s = _ewma(self.tokens_per_s, completion_tokens / seconds)
        self.minute_tokens += prompt_tokens + completion_tokens
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        cost = (prompt_tokens * self.spec.input_cost_per_token
                + completion_tokens * self.spec.output_cost_per_token)
        self.cost += cost
        return cost

    def slow(self, seconds: float) -> None:
        """A timed-out attempt: count it as an answer that took ``seconds`` (both speed measures)."""
        self.latency = _ewma(self.latency, seconds)
        self.ttft = _ewma(self.ttft, seconds)

    def failed(self, now: float, allowed_fails: int, cooldown_time: float, retry_after: float | None) -> bool:
        """Record a failure that counts against the deployment; True when it starts a cooldown now."""
        self.failures += 1
        if retry_after:
            self.not_before = max(self.not_before, now + retry_after)
        times = self.fail_times
        times.append(now)
        while times and times[0] <= now - FAIL_WINDOW_S:
            times.popleft()
        if len(times) >= max(allowed_fails, 1) and cooldown_time > 0 and now >= self.cooldown_until:
            self.cooldown_until = now + cooldown_time
            self.cooldowns += 1
            times.clear()
            return True
        return False

    def wait_s(self, now: float) -> float:
        """Seconds until this deployment takes traffic again (0 when it does now)."""
        return max(self.cooldown_until - now, self.not_before - now, 0.0)
