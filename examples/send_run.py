"""Send one run of the payments feature pipeline to the evaluator, as a pipeline would: with the OpenTelemetry SDK.

    python examples/send_run.py                       # a healthy day, to 127.0.0.1:4317
    python examples/send_run.py --broken              # the broken day from the payments story
    python examples/send_run.py --endpoint host:4317

The run is one span, `features.daily.run`, whose data.* attributes are the payload signals.
"""

from __future__ import annotations

import argparse
import sys

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

HEALTHY = {"data.row_count": 10_240_883, "data.freshness_lag_hours": 0.02, "data.amount_paise.median": 22_000.0}
BROKEN = {"data.row_count": 8_412_406, "data.freshness_lag_hours": 6.0, "data.amount_paise.median": 55.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="127.0.0.1:4317", help="the evaluator's OTLP/gRPC address")
    parser.add_argument("--broken", action="store_true", help="send the broken day's numbers")
    args = parser.parse_args()
    provider = TracerProvider(resource=Resource.create({"service.name": "risk-feature-pipeline"}))
    exporter = OTLPSpanExporter(endpoint=args.endpoint, insecure=True, timeout=10)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("payments").start_as_current_span("features.daily.run") as run:
        run.set_attribute("data.dataset", "payments/transactions_yesterday")
        for key, value in (BROKEN if args.broken else HEALTHY).items():
            run.set_attribute(key, value)
    provider.shutdown()
    print(f"sent one {'broken' if args.broken else 'healthy'} run of features.daily.run to {args.endpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
