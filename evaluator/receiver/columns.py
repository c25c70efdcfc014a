"""A decoded request as Arrow tables (evaluator.store.columns.SpanColumns), the unit the receivers hand to the
span writer, with the counts the receiver reports.

Conversion to Arrow happens in the receiving thread, so the single writer thread does only vectorized work.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from evaluator.receiver.decode import SpanBatch, rejection_message
from evaluator.store.columns import ARRAY_SCHEMA, NUMBER_SCHEMA, SPAN_SCHEMA, STRING_SCHEMA, TS, SpanColumns

__all__ = ["ARRAY_SCHEMA", "NUMBER_SCHEMA", "SPAN_SCHEMA", "STRING_SCHEMA", "TS", "Decoded", "SpanColumns",
           "columns_from_batch"]


@dataclass(frozen=True)
class Decoded:
    """A decoded request: the Arrow tables of its stored spans plus the counts the receiver reports."""

    columns: SpanColumns
    received: int  # spans in the request
    dropped: int  # spans without a signal attribute (not an error; counted)
    rejected: int  # invalid spans, reported through partial_success
    reasons: list[str]  # why, for the first few rejected spans

    def error_message(self) -> str:
        return rejection_message(self.received, self.rejected, self.reasons)


def columns_from_batch(batch: SpanBatch) -> SpanColumns:
    spans = pa.table([
        pa.array(batch.trace_id, pa.string()),
        pa.array(batch.span_id, pa.string()),
        pa.array(batch.parent_span_id, pa.string()),
        pa.array(batch.name, pa.string()),
        pa.array(batch.kind, pa.int32()),
        pa.array(batch.start_us, TS),
        pa.array(batch.end_us, TS),
        pa.array(batch.status_code, pa.int32()),
        pa.array(batch.status_message, pa.string()),
        pa.array(batch.service_name, pa.string()),
        pa.array(batch.scope_name, pa.string()),
        pa.array(batch.resource_attributes, pa.string()),
    ], schema=SPAN_SCHEMA)
    numbers = pa.table([pa.array(batch.num_span, pa.int32()), pa.array(batch.num_key, pa.string()),
                        pa.array(batch.num_value, pa.float64())], schema=NUMBER_SCHEMA)
    strings = pa.table([pa.array(batch.str_span, pa.int32()), pa.array(batch.str_key, pa.string()),
                        pa.array(batch.str_value, pa.string())], schema=STRING_SCHEMA)
    arrays = pa.table([pa.array(batch.arr_span, pa.int32()), pa.array(batch.arr_key, pa.string()),
                       pa.array(batch.arr_numbers, pa.list_(pa.float64())),
                       pa.array(batch.arr_strings, pa.list_(pa.string()))], schema=ARRAY_SCHEMA)
    return SpanColumns(spans, numbers, strings, arrays)
