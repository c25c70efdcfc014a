"""One ingest path for both transports: size check -> admission -> decode -> group commit -> answer.

The gRPC and HTTP servers only move bytes and map `Refused` to their wire answers (errors.py); everything that
decides what happens to a request is here, so both transports behave the same and are counted the same.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import structlog
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from evaluator.clock import Clock
from evaluator.receiver.columns import Decoded
from evaluator.receiver.decode import DecodeError
from evaluator.receiver.errors import Refusal, Refused
from evaluator.receiver.fairness import Admission, Admitted, FairnessSettings
from evaluator.receiver.fastdecode import decode_bytes, decode_message
from evaluator.receiver.limits import SpanLimits, apply_limits
from evaluator.store.writer import SpanWriter, WriterClosed
from evaluator.telemetry import Telemetry


@dataclass(frozen=True)
class IngestSettings:
    keep_prefixes: tuple[str, ...] | None = ("data.", "ml.")  # None keeps every span
    max_request_bytes: int = 64 * 1024 * 1024  # after decompression
    inflight_bytes: int = 128 * 1024 * 1024  # wire bytes admitted and not yet committed
    retry_after_seconds: float = 1.0
    commit_timeout_seconds: float = 30.0
    limits: SpanLimits = field(default_factory=SpanLimits)  # per span: attributes, value lengths
    fairness: FairnessSettings = field(default_factory=FairnessSettings)  # per-client shares of inflight_bytes


@dataclass(frozen=True)
class IngestResult:
    rejected: int
    message: str  # empty on full success (partial_success stays unset)


class Ingestor:
    def __init__(
        self,
        writer: SpanWriter,
        telemetry: Telemetry,
        clock: Clock,
        settings: IngestSettings,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._writer = writer
        self._clock = clock
        self.settings = settings
        self._log = log or structlog.get_logger("ingest")
        self.budget = Admission(settings.inflight_bytes, settings.fairness)
        self._received = telemetry.counter("spans_received_total", "Spans in accepted requests.", ("transport",))
        self._dropped = telemetry.counter(
            "spans_dropped_total", "Spans not stored because they carry no signal attribute.", ("reason",))
        self._rejected = telemetry.counter(
            "spans_rejected_total", "Spans refused individually (partial_success): invalid, or over a per-span "
            "limit with action reject.", ("transport",))
        self._truncated = telemetry.counter(
            "attributes_truncated_total", "Attributes not stored (too_many_attributes) or values cut "
            "(value_too_long) by the per-span limits (action truncate).", ("reason",))
        self._rejected_limit = telemetry.counter(
            "spans_rejected_over_limit_total", "Spans refused by the per-span limits (action reject), by reason; "
            "also counted in spans_rejected_total.", ("reason",))
        self._refused = telemetry.counter(
            "requests_refused_total", "Whole requests refused, by reason.", ("transport", "reason"))
        self._refused_spans = telemetry.counter(
            "spans_refused_total", "Spans in requests refused whole (when the request could be decoded).",
            ("transport", "reason"))
        inflight = telemetry.gauge("inflight_bytes", "Request bytes admitted and not yet committed.")
        telemetry.add_collector(lambda: inflight.set(self.budget.used))
        clients = telemetry.gauge("receiver_clients_active", "Clients that sent within receivers.fairness."
                                  "client_idle or hold request bytes; the in-flight budget is shared among them.")
        telemetry.add_collector(lambda: clients.set(self.budget.active_clients(self._clock.now())))

    # -- entry points ----------------------------------------------------------------------------------------
    def export_protobuf(self, data: bytes, transport: str, client: str = "") -> IngestResult:
        """A serialized ExportTraceServiceRequest (already decompressed). client: who sent it (fairness.client_key)."""
        self._check_size(len(data), transport)
        return self._admitted(len(data), transport, client, lambda: decode_bytes(data, self.settings.keep_prefixes),
                              lambda: ExportTraceServiceRequest.FromString(data))

    def export_message(self, request: ExportTraceServiceRequest, size: int, transport: str,
                       client: str = "") -> IngestResult:
        """An already parsed request (the OTLP/JSON path); size is the body size for the byte budget."""
        self._check_size(size, transport)
        return self._admitted(size, transport, client,
                              lambda: decode_message(request, self.settings.keep_prefixes), lambda: request)

    def refuse(self, kind: Refusal, message: str, transport: str) -> Refused:
        """Count a refusal decided by a transport (e.g. an unsupported content type) and return it to raise."""
        self._refused.inc(transport=transport, reason=kind.reason)
        return Refused(kind, message, self.settings.retry_after_seconds if kind.retryable else None)

    # -- internals -------------------------------------------------------------------------------------------
    def _limit(self, result: Decoded, wire: Callable[[], ExportTraceServiceRequest]) -> Decoded:
        outcome = apply_limits(result, self.settings.limits, wire)
        if outcome.dropped_attributes:
            self._truncated.inc(outcome.dropped_attributes, reason="too_many_attributes")
        if outcome.cut_values:
            self._truncated.inc(outcome.cut_values, reason="value_too_long")
        for reason, n in outcome.rejected.items():
            self._rejected_limit.inc(n, reason=reason)
        return outcome.decoded

    def _check_size(self, size: int, transport: str) -> None:
        limit = self.settings.max_request_bytes
        if size > limit:
            raise self.refuse(Refusal.TOO_LARGE, f"request is {size} bytes, over the limit of {limit} bytes",
                              transport)

    def _admitted(self, size: int, transport: str, client: str, decode: Callable[[], Decoded],
                  wire: Callable[[], ExportTraceServiceRequest]) -> IngestResult:
        admitted = self.budget.admit(client, size, self._clock.now(), transport)
        if not isinstance(admitted, Admitted):
            raise self.refuse(admitted.kind, admitted.message, transport)
        try:
            try:
                result: Decoded = self._limit(decode(), wire)
            except DecodeError as exc:
                raise self.refuse(Refusal.UNDECODABLE, f"cannot decode ExportTraceServiceRequest: {exc}",
                                  transport) from None
            except MemoryError:  # the C decoder, protobuf and Arrow raise it when an allocation fails
                raise self.refuse(Refusal.OUT_OF_MEMORY, f"not enough memory to decode this request ({size} "
                                  "bytes); send smaller requests", transport) from None
            if len(result.columns):
                columns = result.columns
                try:
                    future = self._writer.submit(columns, int(self._clock.now() * 1_000_000),
                                                 client if self.settings.fairness.enabled else "")
                    future.result(timeout=self.settings.commit_timeout_seconds)
                except WriterClosed:
                    self._refused_spans.inc(result.received, transport=transport, reason="shutting_down")
                    raise self.refuse(Refusal.SHUTTING_DOWN, "the evaluator is shutting down; retry later",
                                      transport) from None
                except FutureTimeout:
                    self._refused_spans.inc(result.received, transport=transport, reason="store_failed")
                    raise self.refuse(Refusal.STORE_FAILED, "the store did not commit in time; retry later",
                                      transport) from None
                except Exception as exc:  # a failed commit: nothing of this request is stored
                    self._refused_spans.inc(result.received, transport=transport, reason="store_failed")
                    raise self.refuse(Refusal.STORE_FAILED, f"the store could not commit: {exc}; retry later",
                                      transport) from None
        finally:
            self.budget.release_client(admitted, self._clock.now())
        self._received.inc(result.received, transport=transport)
        if result.dropped:
            self._dropped.inc(result.dropped, reason="no_signal_attribute")
        if result.rejected:
            self._rejected.inc(result.rejected, transport=transport)
        return IngestResult(result.rejected, result.error_message())
