"""The payments story's data (../shared/SCENARIO.md), built once and sent with the real OpenTelemetry SDK.

Shared by `otel-evaluator demo` and examples/send_run.py. A run of the overnight feature pipeline is one span,
`features.daily.run` from `risk-feature-pipeline`, whose data.* attributes are the payload signals the rules in
rules/payments.rules.yaml read; the transactions behind the amount drift are `payments.transaction` spans from
`payments-api` (rules/payments-drift.rules.yaml). Everything is deterministic: the same call sends the same values.

Healthy day: newest event at 23:59 (0.02 h before midnight), about 10,000,000 rows, amounts lognormal in paise
(mean log 10.0, sigma 1.5: median about Rs 220). Broken day: six hours stale, 8,412,406 rows (-17.8%), amounts
lognormal with mean log 4.0, sigma 1.0 (a partner reports rupees, not paise: median about Rs 0.55).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

SERVICE = "risk-feature-pipeline"
RUN_SPAN = "features.daily.run"
DATASET = "payments/transactions_yesterday"
TXN_SERVICE = "payments-api"
TXN_SPAN = "payments.transaction"
PARTNERS = ("partner-a", "partner-b")  # partner-b switches from paise to rupees on the broken day
BROKEN_PARTNER = "partner-b"

DAY = 86_400
NS = 1_000_000_000
# 10 log-spaced bins from 1 to 1e8 paise (outer bins open), as the PSI contract in payments.rules.yaml expects.
BOUNDS = [10.0**k for k in range(9)]

# 14 healthy days of row counts (within +-2.5% of 10,000,000) and daily medians in paise (Rs 200 to Rs 245).
HEALTHY_ROWS = (10_012_554, 9_874_310, 10_103_992, 9_951_207, 10_188_016, 9_903_618, 10_066_431, 9_989_045,
                10_157_220, 9_921_876, 10_034_519, 10_118_764, 9_968_302, 10_240_883)
HEALTHY_MEDIANS = (20_000.0, 24_500.0, 21_000.0, 23_800.0, 22_000.0, 22_500.0, 21_800.0, 23_000.0, 22_200.0,
                   21_500.0, 23_300.0, 22_800.0, 21_900.0, 22_600.0)
HEALTHY_AMOUNT = (10.0, 1.5)  # mean and sigma of log(amount in paise)
BROKEN_AMOUNT = (4.0, 1.0)
HEALTHY_LAG_HOURS = 0.02
BROKEN_LAG_HOURS = 6.0
BROKEN_ROWS = 8_412_406
BROKEN_MEDIAN = 55.0
TXN_PER_PARTNER_PER_DAY = 20
TXN_PER_PARTNER_NOW = 30  # in the 6 h window the drift rule calls "current"


def amount_histogram(rows: int, mu: float, sigma: float) -> list[int]:
    """Counts per bin (BOUNDS) of `rows` lognormal amounts: the expected counts, rounded."""
    dist = NormalDist(mu, sigma)
    cdf = [0.0, *(dist.cdf(math.log(b)) for b in BOUNDS), 1.0]
    return [round(rows * (hi - lo)) for lo, hi in itertools.pairwise(cdf)]


def run_attributes(broken: bool, day: int = len(HEALTHY_ROWS) - 1) -> dict[str, Any]:
    """The data.* attributes of one run: the broken day's, or healthy day `day` (0..13) of the story."""
    if broken:
        rows, median, lag, (mu, sigma) = BROKEN_ROWS, BROKEN_MEDIAN, BROKEN_LAG_HOURS, BROKEN_AMOUNT
    else:
        i = day % len(HEALTHY_ROWS)
        rows, median, lag, (mu, sigma) = HEALTHY_ROWS[i], HEALTHY_MEDIANS[i], HEALTHY_LAG_HOURS, HEALTHY_AMOUNT
    return {
        "data.dataset": DATASET,
        "data.row_count": rows,
        "data.freshness_lag_hours": lag,
        "data.amount_paise.median": median,
        "data.amount_paise.histogram.bounds": BOUNDS,
        "data.amount_paise.histogram.counts": amount_histogram(rows, mu, sigma),
    }


@dataclass(frozen=True)
class SpanSpec:
    service: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


def _amounts(n: int, mu: float, sigma: float, rng: random.Random) -> list[float]:
    """n lognormal amounts at evenly spaced quantiles (no sampling noise), in random order, rounded to the paisa."""
    dist = NormalDist(mu, sigma)
    values = [max(1.0, round(math.exp(dist.inv_cdf((i + 0.5) / n)))) for i in range(n)]
    rng.shuffle(values)
    return values


def story(now: float, days: int = len(HEALTHY_ROWS)) -> list[SpanSpec]:
    """`days` healthy days and then the broken one, all ending before `now` (unix seconds): one run a day, the
    last one a minute before now, and the partners' transactions; partner-b's amounts of the last 6 h are in
    rupees (100x too small). Runs come first, in time order, then the transactions."""
    runs: list[SpanSpec] = []
    for k in range(days, -1, -1):  # k days ago; k == 0 is today's run, the broken one
        end = now - k * DAY - 60
        attrs = run_attributes(broken=k == 0, day=days - k)
        runs.append(SpanSpec(SERVICE, RUN_SPAN, int((end - 600) * NS), int(end * NS), attrs))
    rng = random.Random(7)
    txns: list[SpanSpec] = []
    mu, sigma = HEALTHY_AMOUNT
    for partner in PARTNERS:
        for k in range(days, 0, -1):  # 18 hours of each past day, all before the drift rule's 6 h window
            day_start = now - k * DAY
            step = 18 * 3600 / TXN_PER_PARTNER_PER_DAY
            for j, amount in enumerate(_amounts(TXN_PER_PARTNER_PER_DAY, mu, sigma, rng)):
                end = day_start + j * step
                txns.append(_txn(partner, end, amount))
        step = (6 * 3600 - 120) / TXN_PER_PARTNER_NOW
        for j, amount in enumerate(_amounts(TXN_PER_PARTNER_NOW, mu, sigma, rng)):
            end = now - 6 * 3600 + (j + 0.5) * step
            txns.append(_txn(partner, end, max(1.0, round(amount / 100)) if partner == BROKEN_PARTNER else amount))
    txns.sort(key=lambda s: s.end_ns)
    return runs + txns


def _txn(partner: str, end: float, amount: float) -> SpanSpec:
    return SpanSpec(TXN_SERVICE, TXN_SPAN, int((end - 0.05) * NS), int(end * NS),
                    {"data.partner": partner, "data.amount_paise": amount})


class SendFailed(Exception):
    pass


def send(endpoint: str, spans: Sequence[SpanSpec], headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> int:
    """Send the spans with the OpenTelemetry SDK's OTLP/gRPC exporter, one TracerProvider per service (the
    service is a resource attribute). Returns how many were sent; raises SendFailed when an export failed.
    `endpoint` is host:port (plaintext) or https://host:port."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Checked(SpanExporter):
        """The SDK's exporter, remembering whether every export succeeded (the SDK only logs failures)."""

        def __init__(self) -> None:
            secure = endpoint.startswith("https://")
            self.inner = OTLPSpanExporter(endpoint=endpoint, insecure=not secure, timeout=int(timeout),
                                          headers=headers or None)
            self.failed = 0

        def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
            result = self.inner.export(batch)
            if result != SpanExportResult.SUCCESS:
                self.failed += len(batch)
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

    by_service: dict[str, list[SpanSpec]] = {}
    for s in spans:
        by_service.setdefault(s.service, []).append(s)
    failed = 0
    for service, group in by_service.items():
        exporter = Checked()
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        # Runs one export each, in order (per-run rules judge runs in end-time order); many small spans in batches.
        processor = SimpleSpanProcessor(exporter) if len(group) < 100 else BatchSpanProcessor(
            exporter, max_export_batch_size=512, schedule_delay_millis=50)
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("otel-evaluator.demo")
        for s in group:
            span = tracer.start_span(s.name, start_time=s.start_ns, attributes=s.attributes)
            span.end(end_time=s.end_ns)
        provider.shutdown()  # flushes
        failed += exporter.failed
    if failed:
        raise SendFailed(f"{failed} of {len(spans)} spans were not accepted by {endpoint}")
    return len(spans)
