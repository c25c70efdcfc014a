"""otel-evaluator: an OTLP evaluator daemon for the payload signals on your spans."""

__version__ = "0.1.0"
