"""grpc.health.v1 and server reflection."""

from __future__ import annotations

import grpc
from conftest import RunningDaemon
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from evaluator.receiver.grpc_server import TRACE_SERVICE


def test_health_service_reports_serving(daemon: RunningDaemon) -> None:
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", TRACE_SERVICE):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_trace_service(daemon: RunningDaemon) -> None:
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {TRACE_SERVICE, "grpc.health.v1.Health"} <= names
