// The OpenTelemetry JavaScript SDK as a real OTLP client, for tests/test_js_sdk.py.
//
//   node tests/js/send.mjs --protocol http-json|http-proto|grpc --endpoint URL --count N --trace-prefix HEX
//                          [--repeat R] [--compression none|gzip]
//
// Emits N root spans `features.daily.run` (service.name js-pipeline), one per trace, with explicit start/end
// times and the data.* attributes below, plus one child span `db.query` (no data.* attribute: the daemon drops
// it) under the first run. The spans go through a BatchSpanProcessor into the real exporter for the protocol;
// with --repeat R the exporter is asked R times to export the very same ReadableSpans (same ids and times), as a
// retrying client would. Prints one JSON line: {protocol, spans: [{trace_id, span_id, parent_span_id, name,
// start_ns, end_ns}], exports: [{code, error}], warnings: [...]} and exits 0 only if every export succeeded.
//
// --endpoint: http://host:port for the HTTP protocols (/v1/traces is appended when the URL has no path);
// host:port or http://host:port for gRPC (plaintext). Trace ids are --trace-prefix (hex, up to 24 digits)
// followed by the run's number, zero-padded to 32 hex digits; span ids are the SDK's random ones.

import { parseArgs } from 'node:util';

import { diag, DiagLogLevel, ROOT_CONTEXT, SpanKind, trace } from '@opentelemetry/api';
import { OTLPTraceExporter as GrpcExporter } from '@opentelemetry/exporter-trace-otlp-grpc';
import { OTLPTraceExporter as HttpJsonExporter } from '@opentelemetry/exporter-trace-otlp-http';
import { OTLPTraceExporter as HttpProtoExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { defaultResource, resourceFromAttributes } from '@opentelemetry/resources';
import { BasicTracerProvider, BatchSpanProcessor, RandomIdGenerator } from '@opentelemetry/sdk-trace-base';

const PROTOCOLS = ['http-json', 'http-proto', 'grpc'];
// 2024-05-01T02:00:00Z; every time carries sub-microsecond nanoseconds, which the daemon truncates.
const BASE_SECONDS = 1714528800;

function fail(message) {
  process.stderr.write(`send.mjs: ${message}\n`);
  process.exit(2);
}

const { values: args } = parseArgs({
  options: {
    protocol: { type: 'string' },
    endpoint: { type: 'string' },
    count: { type: 'string', default: '1' },
    'trace-prefix': { type: 'string', default: '' },
    repeat: { type: 'string', default: '1' },
    compression: { type: 'string', default: 'none' },
  },
  strict: true,
});
if (!PROTOCOLS.includes(args.protocol)) fail(`--protocol must be one of ${PROTOCOLS.join(', ')}`);
if (!args.endpoint) fail('--endpoint is required');
const count = Number(args.count);
const repeat = Number(args.repeat);
if (!Number.isInteger(count) || count < 1) fail('--count must be a positive integer');
if (!Number.isInteger(repeat) || repeat < 1) fail('--repeat must be a positive integer');
const prefix = args['trace-prefix'].toLowerCase();
if (!/^[0-9a-f]{0,24}$/.test(prefix)) fail('--trace-prefix must be at most 24 hex digits');
if (!['none', 'gzip'].includes(args.compression)) fail('--compression must be none or gzip');

// Warnings the SDK logs (a partial_success answer is only logged, not an export failure) end up in the output.
const warnings = [];
diag.setLogger({
  error: (...m) => warnings.push(m.join(' ')),
  warn: (...m) => warnings.push(m.join(' ')),
  info: () => {},
  debug: () => {},
  verbose: () => {},
}, DiagLogLevel.WARN);

function makeExporter() {
  const compression = args.compression;
  if (args.protocol === 'grpc') {
    const url = /^[a-z]+:\/\//.test(args.endpoint) ? args.endpoint : `http://${args.endpoint}`;
    return new GrpcExporter({ url, compression });
  }
  const base = new URL(args.endpoint);
  const url = base.pathname === '/' ? new URL('/v1/traces', base).toString() : base.toString();
  const Exporter = args.protocol === 'http-json' ? HttpJsonExporter : HttpProtoExporter;
  return new Exporter({ url, compression });
}

// Exports each batch `repeat` times (the same ReadableSpan objects) and remembers every result.
class RepeatingExporter {
  constructor(inner, times) {
    this.inner = inner;
    this.times = times;
    this.results = [];
  }

  export(spans, resultCallback) {
    const once = (left) => {
      this.inner.export(spans, (result) => {
        this.results.push({ code: result.code, error: result.error ? String(result.error) : null });
        if (left > 1) once(left - 1);
        else resultCallback(result);
      });
    };
    once(this.times);
  }

  forceFlush() {
    return this.inner.forceFlush ? this.inner.forceFlush() : Promise.resolve();
  }

  shutdown() {
    return this.inner.shutdown();
  }
}

// Trace ids the test can recognise; span ids stay the SDK's random ones.
class PrefixedIdGenerator {
  constructor(tracePrefix) {
    this.prefix = tracePrefix;
    this.n = 0;
    this.random = new RandomIdGenerator();
  }

  generateTraceId() {
    this.n += 1;
    return this.prefix + this.n.toString(16).padStart(32 - this.prefix.length, '0');
  }

  generateSpanId() {
    return this.random.generateSpanId();
  }
}

const hr = (seconds, nanos) => [seconds, nanos];
const toNs = ([s, n]) => (BigInt(s) * 1000000000n + BigInt(n)).toString();

const exporter = new RepeatingExporter(makeExporter(), repeat);
const provider = new BasicTracerProvider({
  resource: defaultResource().merge(resourceFromAttributes({ 'service.name': 'js-pipeline' })),
  idGenerator: new PrefixedIdGenerator(prefix),
  spanProcessors: [new BatchSpanProcessor(exporter, { maxExportBatchSize: 512, maxQueueSize: 2048 })],
});
const tracer = provider.getTracer('js-sender', '1.0.0');

const sent = [];
const record = (span, name, start, end) => {
  const ctx = span.spanContext();
  sent.push({
    trace_id: ctx.traceId,
    span_id: ctx.spanId,
    parent_span_id: span.parentSpanContext?.spanId ?? null,
    name,
    start_ns: toNs(start),
    end_ns: toNs(end),
  });
};

for (let i = 0; i < count; i++) {
  const start = hr(BASE_SECONDS + i * 3600, 123456789);
  const end = hr(BASE_SECONDS + i * 3600 + 90, 987654321);
  const run = tracer.startSpan('features.daily.run', { kind: SpanKind.INTERNAL, startTime: start }, ROOT_CONTEXT);
  run.setAttribute('data.dataset', `js/ds-${i}`);
  run.setAttribute('data.row_count', i * 1000);
  run.setAttribute('data.freshness_lag_hours', 0.25 + i);
  run.setAttribute('data.complete', i % 2 === 0);
  run.setAttribute('data.amount_paise.histogram.bounds', [1.0, 10.0, 100.0]);
  run.setAttribute('data.amount_paise.histogram.counts', [1, 2, 3, 4]);
  if (i === 0) {
    const childStart = hr(BASE_SECONDS + 1, 500);
    const childEnd = hr(BASE_SECONDS + 2, 750);
    const child = tracer.startSpan('db.query', { kind: SpanKind.CLIENT, startTime: childStart },
      trace.setSpan(ROOT_CONTEXT, run));
    child.setAttribute('db.system', 'duckdb');
    child.end(childEnd);
    record(child, 'db.query', childStart, childEnd);
  }
  run.end(end);
  record(run, 'features.daily.run', start, end);
}

let exitCode = 1;
try {
  await provider.forceFlush();
  await provider.shutdown();
  const ok = exporter.results.length > 0 && exporter.results.every((r) => r.code === 0);
  exitCode = ok ? 0 : 1;
} catch (err) {
  warnings.push(`flush/shutdown failed: ${err}`);
}
process.stdout.write(JSON.stringify({
  protocol: args.protocol,
  compression: args.compression,
  spans: sent,
  exports: exporter.results,
  warnings,
}) + '\n');
process.exitCode = exitCode;
