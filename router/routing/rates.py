"""Per-worker prefill rate and decode cost, learned online from observed time to first token.

The hybrid cost model prices a request on a worker as fixed latency + prefill tokens ahead of
its first token / prefill rate + running sequences x decode cost. The YAML gives the prior; each
streamed answer gives one sample: the prefill tokens that had to run first (the worker's backlog
at dispatch plus this prompt's uncached tokens, as the worker reported them), the sequences
running at dispatch, and the TTFT the gateway saw. Every `refit_every` samples (a quarter window
once the window is full) a least-squares fit over the last `window` samples (bounded memory) is
refitted, once more without the samples whose residual exceeds three median absolute deviations
(a GC pause or a stalled step must not move the rates), then clamped to a factor of the prior
and blended with it by sample count, so the first few samples cannot swing routing. A worker
takes the median of the pool's fitted workers unless its own values differ from it by more than
`deadband` (a quarter): identical workers whose fits differ by noise alone must look identical,
or every cold prompt goes to whichever fit came out fastest (measured: imbalance 3.2, all cold
prompts on two of eight workers). A worker on a different GPU differs by far more and gets its
own numbers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

_SPAN = 10.0
"""Learned values stay within prior / _SPAN .. prior * _SPAN."""


@dataclass(slots=True)
class _Samples:
    rows: deque[tuple[float, float, float]]
    pending: int = 0
    fitted: int = 0
    rate: float = 0.0
    decode_s: float = 0.0


@dataclass
class LearnedRates:
    prior_rate: float
    prior_decode_s: float
    window: int = 128
    refit_every: int = 8
    prior_weight: int = 16
    """Samples the prior counts as, when blending."""
    deadband: float = 0.25
    _workers: dict[str, _Samples] = field(default_factory=dict)
    _median_rate: float = 0.0
    _median_decode_s: float = 0.0

    def rate(self, worker_id: str) -> float:
        base = self._median_rate or self.prior_rate
        own = self._workers.get(worker_id)
        if own is None or not own.fitted or abs(own.rate / base - 1) <= self.deadband:
            return base
        return own.rate

    def decode_s(self, worker_id: str) -> float:
        base = self._median_decode_s if self._median_rate else self.prior_decode_s
        own = self._workers.get(worker_id)
        if own is None or not own.fitted:
            return base
        if abs(own.decode_s - base) <= self.deadband * max(base, self.prior_decode_s):
            return base
        return own.decode_s

    def observe(self, worker_id: str, prefill_tokens: int, running: int, ttft_s: float) -> None:
        if ttft_s <= 0 or prefill_tokens < 0:
            return
        samples = self._workers.get(worker_id)
        if samples is None:
            samples = self._workers[worker_id] = _Samples(deque(maxlen=self.window))
        samples.rows.append((float(prefill_tokens), float(running), ttft_s))
        samples.pending += 1
        # A worker with a full window is refitted a quarter as often: each fit is over the
        # whole window, and a settled worker moves slowly (the fit was 1.5% of gateway CPU).
        full = len(samples.rows) >= self.window
        every = max(self.refit_every, self.window // 4) if full else self.refit_every
        if samples.pending >= every:
            samples.pending = 0
            self._refit(samples)
            self._update_medians()

    def forget(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        self._update_medians()

    def _update_medians(self) -> None:
        fitted = [s for s in self._workers.values() if s.fitted]
        if not fitted:
            self._median_rate = self._median_decode_s = 0.0
            return
        rates = sorted(s.rate for s in fitted)
        decodes = sorted(s.decode_s for s in fitted)
        self._median_rate = rates[len(rates) // 2]
        self._median_decode_s = decodes[len(decodes) // 2]

    def _refit(self, samples: _Samples) -> None:
        rows = list(samples.rows)
        fit = _least_squares(rows)
        if fit is None:
            return
        residuals = [abs(y - (fit[0] + fit[1] * x1 + fit[2] * x2)) for x1, x2, y in rows]
        mad = sorted(residuals)[len(residuals) // 2]
        if mad > 0:
            kept = [row for row, r in zip(rows, residuals, strict=True) if r <= 3 * mad]
            fit = _least_squares(kept) or fit
        _, per_token_s, decode_s = fit
        n = len(rows)
        blend = n / (n + self.prior_weight)
        if per_token_s > 0:
            rate = min(self.prior_rate * _SPAN, max(self.prior_rate / _SPAN, 1.0 / per_token_s))
            samples.rate = blend * rate + (1 - blend) * self.prior_rate
        elif not samples.fitted:
            samples.rate = self.prior_rate
        high = max(self.prior_decode_s, 1e-4) * _SPAN
        decode_s = min(high, max(0.0, decode_s))
        samples.decode_s = blend * decode_s + (1 - blend) * self.prior_decode_s
        samples.fitted += 1


def _least_squares(rows: list[tuple[float, float, float]]) -> tuple[float, float, float] | None:
    """y = a + b x1 + c x2 by the normal equations; None when the samples cannot tell (too few,
    or x1 or x2 never varied: then that coefficient is fitted as 0)."""
    n = len(rows)
    if n < 4:
        return None
    mx1 = sum(r[0] for r in rows) / n
    mx2 = sum(r[1] for r in rows) / n
    my = sum(r[2] for r in rows) / n
    s11 = s22 = s12 = s1y = s2y = 0.0
    for x1, x2, y in rows:
        d1, d2, dy = x1 - mx1, x2 - mx2, y - my
        s11 += d1 * d1
        s22 += d2 * d2
        s12 += d1 * d2
        s1y += d1 * dy
        s2y += d2 * dy
    if s11 <= 0:
        return None
    det = s11 * s22 - s12 * s12
    if s22 <= 0 or det <= 1e-12 * s11 * s22:
        b, c = s1y / s11, 0.0
    else:
        b = (s1y * s22 - s2y * s12) / det
        c = (s2y * s11 - s1y * s12) / det
    return my - b * mx1 - c * mx2, b, c
