"""The one place that maps ingest failures to wire answers (gRPC status codes and HTTP statuses).

Retryable failures (overload, a client over its share of the budget, shutting down, a failed commit) become
UNAVAILABLE / 503 with a retry delay: collectors and SDKs retry those. RESOURCE_EXHAUSTED is used only for a
request that is too large, or that ran the decoder out of memory, which is permanent for that request:
collectors drop RESOURCE_EXHAUSTED without RetryInfo, which is what we want there (retrying the same bytes would
fail the same way).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class Refusal(enum.Enum):
    # value: (metric reason, gRPC code, HTTP status, retryable)
    OVERLOADED = ("overloaded", grpc.StatusCode.UNAVAILABLE, 503, True)
    # The client already holds its share of the in-flight budget while other clients are sending (fairness.py).
    OVER_CLIENT_SHARE = ("over_client_share", grpc.StatusCode.UNAVAILABLE, 503, True)
    SHUTTING_DOWN = ("shutting_down", grpc.StatusCode.UNAVAILABLE, 503, True)
    STORE_FAILED = ("store_failed", grpc.StatusCode.UNAVAILABLE, 503, True)
    TOO_LARGE = ("too_large", grpc.StatusCode.RESOURCE_EXHAUSTED, 413, False)
    OUT_OF_MEMORY = ("out_of_memory", grpc.StatusCode.RESOURCE_EXHAUSTED, 413, False)
    # HTTP only: the body's framing is wrong (RFC 9112), so not even its bytes could be read; the HTTP status
    # is the one the framing check chose (400, 408 for a stalled body, 501 for an unknown transfer coding).
    BAD_FRAMING = ("bad_framing", grpc.StatusCode.INVALID_ARGUMENT, 400, False)
    UNDECODABLE = ("undecodable", grpc.StatusCode.INVALID_ARGUMENT, 400, False)
    UNSUPPORTED_MEDIA = ("unsupported_media_type", grpc.StatusCode.INVALID_ARGUMENT, 415, False)

    @property
    def reason(self) -> str:
        return self.value[0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[1]

    @property
    def http_status(self) -> int:
        return self.value[2]

    @property
    def retryable(self) -> bool:
        return self.value[3]


@dataclass
class Refused(Exception):
    """The whole request is refused; nothing of it was stored."""

    kind: Refusal
    message: str
    retry_after: float | None = None  # seconds, for retryable refusals

    def __str__(self) -> str:
        return self.message
