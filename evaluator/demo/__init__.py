"""`otel-evaluator demo` (command.py) and the payments story's data it sends (payments.py)."""
