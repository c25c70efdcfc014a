"""Send one run of the payments feature pipeline to the evaluator, as a pipeline would: with the OpenTelemetry SDK.

    python examples/send_run.py                       # a healthy day, to 127.0.0.1:4317
    python examples/send_run.py --broken              # the broken day from the payments story
    python examples/send_run.py --endpoint host:4317

The run is one span, `features.daily.run` from `risk-feature-pipeline`, ending now, whose data.* attributes are the
payload signals (row count, freshness lag, amount median and histogram). The values are the payments story's, built
by evaluator/demo/payments.py, which `otel-evaluator demo` sends too (fourteen healthy days and the broken one).
"""

from __future__ import annotations

import argparse
import sys
import time

from evaluator.demo.payments import RUN_SPAN, SERVICE, SendFailed, SpanSpec, run_attributes, send


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default="127.0.0.1:4317", help="the evaluator's OTLP/gRPC address")
    parser.add_argument("--broken", action="store_true", help="send the broken day's numbers")
    args = parser.parse_args()
    end = time.time_ns()
    run = SpanSpec(SERVICE, RUN_SPAN, end - 600 * 10**9, end, run_attributes(broken=args.broken))
    try:
        send(args.endpoint, [run])
    except SendFailed as exc:
        print(f"send_run: {exc}", file=sys.stderr)
        return 1
    print(f"sent one {'broken' if args.broken else 'healthy'} run of {RUN_SPAN} to {args.endpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
