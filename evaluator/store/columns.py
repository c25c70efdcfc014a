"""SpanColumns: a batch of spans as Arrow tables, the unit the span writer commits.

The receivers build them (evaluator/receiver/columns.py) in the receiving thread, so the single writer thread does
only vectorized work (span keys, the denormalised time) and DuckDB inserts, which release the GIL. They belong to
the store: the writer takes them, and nothing here knows where they came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TS = pa.timestamp("us")

SPAN_SCHEMA = pa.schema([
    ("trace_id", pa.string()),
    ("span_id", pa.string()),
    ("parent_span_id", pa.string()),
    ("name", pa.string()),
    ("kind", pa.int32()),
    ("start_time", TS),
    ("end_time", TS),
    ("status_code", pa.int32()),
    ("status_message", pa.string()),
    ("service_name", pa.string()),
    ("scope_name", pa.string()),
    ("resource_attributes", pa.string()),
])
NUMBER_SCHEMA = pa.schema([("span_idx", pa.int32()), ("key", pa.string()), ("value", pa.float64())])
STRING_SCHEMA = pa.schema([("span_idx", pa.int32()), ("key", pa.string()), ("value", pa.string())])
ARRAY_SCHEMA = pa.schema([("span_idx", pa.int32()), ("key", pa.string()), ("numbers", pa.list_(pa.float64())),
                          ("strings", pa.list_(pa.string()))])


@dataclass(frozen=True)
class SpanColumns:
    spans: pa.Table  # SPAN_SCHEMA
    numbers: pa.Table  # NUMBER_SCHEMA; span_idx indexes rows of `spans`
    strings: pa.Table  # STRING_SCHEMA
    arrays: pa.Table  # ARRAY_SCHEMA

    def __len__(self) -> int:
        return int(self.spans.num_rows)

    @property
    def start_range(self) -> tuple[int, int]:
        """Smallest and largest start time, in microseconds (the writer's dedupe window)."""
        mm = pc.min_max(self.spans.column("start_time"))
        return int(mm["min"].value), int(mm["max"].value)

    def keyed(self, base_key: int, received_us: int) -> dict[str, pa.Table]:
        """The four tables in the store's column order, span keys base_key.. and the end time on every row."""
        n = len(self)
        keys = pa.array(np.arange(base_key, base_key + n, dtype=np.int64))
        spans = self.spans.add_column(0, "span_key", keys).append_column(
            "received_at", pa.array(np.full(n, received_us, dtype=np.int64), TS))
        end = self.spans.column("end_time")
        out = {"spans": spans}
        for name, table in (("span_numbers", self.numbers), ("span_strings", self.strings),
                            ("span_arrays", self.arrays)):
            idx = table.column("span_idx")
            rows = table.drop_columns(["span_idx"])
            span_keys = pc.add(pc.cast(idx, pa.int64()), pa.scalar(base_key, pa.int64()))
            rows = rows.add_column(0, "time", pc.take(end, idx)).add_column(0, "span_key", span_keys)
            out[name] = rows
        return out
