/**
 * The broker's metrics, held per broker instance (no module-level state): Prometheus text for
 * `GET /metrics`, and CloudWatch Embedded Metric Format lines for each Lambda invocation (`emf`).
 */

type Labels = Readonly<Record<string, string>>;

const LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

interface Family {
  readonly help: string;
  readonly type: 'counter' | 'gauge' | 'histogram';
  /**
   * A counter's series (their labels), shown at 0 until they count: an alert on `increase()` sees
   * no rise in a series that appears with its first count.
   */
  readonly zero?: readonly Labels[];
}

const byOutcome = (...outcomes: string[]): Labels[] => outcomes.map((outcome) => ({ outcome }));

const FAMILIES = {
  broker_events_total: {
    help: 'EventBridge events received, by outcome (accepted, duplicate, ignored, refused)',
    type: 'counter',
    zero: byOutcome('accepted', 'duplicate', 'ignored', 'refused'),
  },
  broker_unusable_writes_total: {
    help: 'Successful FHIR writes among the ignored events that no notification could be derived from (a batch Bundle, or no valid resource type or datastore id)',
    type: 'counter',
    zero: [{}],
  },
  broker_content_reads_total: {
    help: 'Reads of changed resources for content filters, by outcome (read, missing, no_id, failed, unconfigured)',
    type: 'counter',
    // At 0 from the start, so an alert on increase(failed) or increase(missing) sees the first one.
    zero: byOutcome('read', 'missing', 'no_id', 'failed', 'unconfigured'),
  },
  broker_content_matches_total: {
    help: 'Content-filter checks of a candidate subscription against a read resource, by outcome',
    type: 'counter',
    zero: byOutcome('matched', 'not_matched', 'unevaluable'),
  },
  broker_full_resources_total: {
    help: 'Changes with full-resource subscribers, by whether their notifications carry the resource (not_allowed: per subscriber whose client is no longer in BROKER_FULL_RESOURCE_CLIENTS)',
    type: 'counter',
    zero: byOutcome('included', 'missing', 'too_large', 'not_allowed'),
  },
  // Seeded at 0 by the reconciler when BROKER_RECONCILE_EVERY is set (absent otherwise).
  broker_reconcile_runs_total: {
    help: 'Reconciliation runs, by outcome (completed, stopped: cut short by close or the invocation time, failed)',
    type: 'counter',
  },
  broker_reconcile_searches_refused_total: {
    help: 'Type searches the FHIR server refused for good, each skipping its type for one window (see the log)',
    type: 'counter',
  },
  broker_reconcile_resources_total: {
    help: 'Changed resources the reconciler found, by outcome (notified, already_notified, not_matched, skipped)',
    type: 'counter',
  },
  broker_reconcile_checkpoint_age_seconds: {
    help: 'How far behind the present the reconciliation checkpoint is (lag included): alert when it keeps growing',
    type: 'gauge',
  },
  broker_notifications_total: {
    help: 'Notification deliveries, by outcome',
    type: 'counter',
    zero: byOutcome('delivered', 'retried', 'dead-lettered', 'gone'),
  },
  broker_handshakes_total: {
    help: 'Handshake attempts, by outcome (retried: failed, tried again)',
    type: 'counter',
    zero: byOutcome('ok', 'retried', 'failed'),
  },
  broker_origin_pauses_total: {
    help: "Pauses an endpoint origin asked for (429 or 503 with Retry-After), held by the client's other subscriptions there",
    type: 'counter',
    zero: [{}],
  },
  broker_heartbeats_total: {
    help: 'Heartbeats, by outcome',
    type: 'counter',
    zero: byOutcome('ok', 'failed', 'refused'),
  },
  broker_delivery_latency_seconds: { help: 'Ingest to successful webhook delivery', type: 'histogram' },
  broker_outbox_depth: { help: 'Notifications waiting for delivery', type: 'gauge' },
  broker_subscriptions: { help: 'Subscriptions in the matching index', type: 'gauge' },
  broker_subscriptions_by_status: {
    help: 'Subscriptions this instance knows, by status (requested, active, error, off): alert on error',
    type: 'gauge',
  },
  broker_websocket_connections: { help: 'Open WebSocket connections on this instance', type: 'gauge' },
  broker_websocket_binds_total: { help: 'WebSocket binds, by outcome', type: 'counter' },
  broker_websocket_messages_total: { help: 'Notification messages pushed over WebSockets', type: 'counter' },
  broker_websocket_closed_total: { help: 'WebSockets closed by the broker, by reason', type: 'counter' },
  broker_websocket_refused_total: { help: 'WebSocket upgrades and binds refused by a cap, by reason', type: 'counter' },
  broker_websocket_protocol_errors_total: { help: 'Client messages that broke the protocol', type: 'counter' },
} as const satisfies Record<string, Family>;

export type MetricName = keyof typeof FAMILIES;

interface Histogram {
  /** Cumulative: observations at or below each of LATENCY_BUCKETS_S. */
  readonly buckets: number[];
  sum: number;
  count: number;
  /** The least and the largest observed since the last EMF report. */
  min: number;
  max: number;
}

/** Where a Lambda function's metrics go: CloudWatch (Embedded Metric Format), under this namespace. */
export const EMF_NAMESPACE = 'FhirSubscriptionBroker';

export class Metrics {
  readonly #counters = new Map<string, number>();
  /** Each counter series' name and labels, for `emf` (recorded once, when the series first counts). */
  readonly #series = new Map<string, { readonly name: MetricName; readonly labels: Labels }>();
  /** What `emf` last reported: counters by series key, histograms' buckets and count by name. */
  readonly #reported = new Map<string, number>();
  readonly #reportedHistograms = new Map<string, { buckets: number[]; count: number; sum: number }>();
  readonly #gauges = new Map<MetricName, () => number | Promise<number>>();
  readonly #labeledGauges = new Map<MetricName, { label: string; read: () => Readonly<Record<string, number>> }>();
  readonly #histograms = new Map<string, Histogram>();
  readonly #keys = new Map<MetricName, Map<string, string>>();

  inc(name: MetricName, labels: Labels = {}, by = 1): void {
    const key = this.#key(name, labels);
    const before = this.#counters.get(key);
    if (before === undefined) this.#series.set(key, { name, labels });
    this.#counters.set(key, (before ?? 0) + by);
  }

  /** A gauge read when the metrics are rendered (a read may go to the store). */
  gauge(name: MetricName, read: () => number | Promise<number>): void {
    this.#gauges.set(name, read);
  }

  /** A gauge with one series per value of `label`, read when the metrics are rendered. */
  labeledGauge(name: MetricName, label: string, read: () => Readonly<Record<string, number>>): void {
    this.#labeledGauges.set(name, { label, read });
  }

  observe(name: MetricName, seconds: number): void {
    let h = this.#histograms.get(name);
    if (h === undefined) {
      h = { buckets: LATENCY_BUCKETS_S.map(() => 0), sum: 0, count: 0, min: Infinity, max: -Infinity };
      this.#histograms.set(name, h);
    }
    for (let i = 0; i < LATENCY_BUCKETS_S.length; i++)
      if (seconds <= (LATENCY_BUCKETS_S[i] as number)) h.buckets[i]! += 1;
    h.sum += seconds;
    h.count += 1;
    if (seconds < h.min) h.min = seconds;
    if (seconds > h.max) h.max = seconds;
  }

  value(name: MetricName, labels: Labels = {}): number {
    return this.#counters.get(this.#key(name, labels)) ?? 0;
  }

  /**
   * Series keys of one-label series are built once: `inc` runs several times per event, and
   * building `name{label="value"}` each time cost more than the counting.
   */
  #key(name: MetricName, labels: Labels): string {
    let only: string | undefined;
    for (const k in labels) {
      if (only !== undefined) return seriesKey(name, labels);
      only = k;
    }
    if (only === undefined) return name;
    const value = labels[only] as string;
    let byLabel = this.#keys.get(name);
    if (byLabel === undefined) {
      byLabel = new Map();
      this.#keys.set(name, byLabel);
    }
    const cacheKey = `${only}=${value}`;
    let key = byLabel.get(cacheKey);
    if (key === undefined) {
      key = seriesKey(name, labels);
      // Label values are a small fixed set (outcomes, reasons); never let a stray one grow this.
      if (byLabel.size < 1000) byLabel.set(cacheKey, key);
    }
    return key;
  }

  /**
   * CloudWatch Embedded Metric Format: what was counted since the last call, as JSON lines a Lambda
   * function writes to its log (CloudWatch Logs turns them into metrics, no API call, no IAM grant).
   * On AWS every container holds its own counts and `/metrics` would show one API container's, so
   * each invocation reports its deltas instead, summed across containers by CloudWatch. A counter
   * series is one line: `dimensions` and its labels as dimensions, the delta as a `Count`. A
   * histogram is one line in `Seconds`, in the form AWS's EMF libraries write histograms: `Values`
   * (each bucket's upper bound; beyond the largest, the largest observation) with their `Counts`,
   * and `Count`, `Sum`, `Min` and `Max` of what was observed since the last report. Each metric is
   * its own line, so one CloudWatch refused costs no other. Gauges are not reported (a
   * per-container value CloudWatch cannot sum).
   */
  emf(dimensions: Readonly<Record<string, string>>, timestamp: number): string[] {
    const lines: string[] = [];
    const line = (name: string, labels: Labels, unit: string, value: unknown): void => {
      const dims = { ...dimensions, ...labels };
      lines.push(
        JSON.stringify({
          _aws: {
            Timestamp: timestamp,
            CloudWatchMetrics: [
              { Namespace: EMF_NAMESPACE, Dimensions: [Object.keys(dims)], Metrics: [{ Name: name, Unit: unit }] },
            ],
          },
          ...dims,
          [name]: value,
        }),
      );
    };
    for (const [key, value] of this.#counters) {
      const delta = value - (this.#reported.get(key) ?? 0);
      const series = this.#series.get(key);
      if (delta <= 0 || series === undefined) continue;
      this.#reported.set(key, value);
      line(series.name, series.labels, 'Count', delta);
    }
    for (const [name, h] of this.#histograms) {
      const before = this.#reportedHistograms.get(name) ?? {
        buckets: LATENCY_BUCKETS_S.map(() => 0),
        count: 0,
        sum: 0,
      };
      if (h.count === before.count) continue;
      const values: number[] = [];
      const counts: number[] = [];
      // Buckets are cumulative (le): each one's own count is its rise over the one below.
      let below = 0;
      LATENCY_BUCKETS_S.forEach((le, i) => {
        const within = (h.buckets[i] ?? 0) - (before.buckets[i] ?? 0) - below;
        below += within;
        if (within > 0) {
          values.push(le);
          counts.push(within);
        }
      });
      // Beyond the largest bucket: the largest observed since the last report stands for them.
      const above = h.count - before.count - below;
      if (above > 0) {
        values.push(h.max);
        counts.push(above);
      }
      this.#reportedHistograms.set(name, { buckets: [...h.buckets], count: h.count, sum: h.sum });
      line(name, {}, 'Seconds', {
        Values: values,
        Counts: counts,
        Count: h.count - before.count,
        Sum: h.sum - before.sum,
        Min: h.min,
        Max: h.max,
      });
      // Min and max are per report.
      h.min = Infinity;
      h.max = -Infinity;
    }
    return lines;
  }

  async render(): Promise<string> {
    const lines: string[] = [];
    for (const [name, family] of Object.entries(FAMILIES) as [MetricName, Family][]) {
      lines.push(`# HELP ${name} ${family.help}`, `# TYPE ${name} ${family.type}`);
      if (family.type === 'counter') {
        for (const labels of family.zero ?? []) {
          const key = this.#key(name, labels);
          if (!this.#counters.has(key)) lines.push(`${key} 0`);
        }
        for (const [key, v] of this.#counters)
          if (key === name || key.startsWith(`${name}{`)) lines.push(`${key} ${v}`);
      } else if (family.type === 'gauge') {
        const read = this.#gauges.get(name);
        if (read !== undefined) lines.push(`${name} ${await read()}`);
        const labeled = this.#labeledGauges.get(name);
        if (labeled !== undefined) {
          for (const [value, n] of Object.entries(labeled.read()))
            lines.push(`${name}{${labeled.label}="${value}"} ${n}`);
        }
      } else {
        // Empty until the first observation, and shown so (a series that appears late hides a rise).
        const h = this.#histograms.get(name) ?? { buckets: LATENCY_BUCKETS_S.map(() => 0), sum: 0, count: 0 };
        LATENCY_BUCKETS_S.forEach((le, i) => {
          lines.push(`${name}_bucket{le="${le}"} ${h.buckets[i]}`);
        });
        lines.push(`${name}_bucket{le="+Inf"} ${h.count}`, `${name}_sum ${h.sum}`, `${name}_count ${h.count}`);
      }
    }
    return `${lines.join('\n')}\n`;
  }
}

function seriesKey(name: string, labels: Labels): string {
  const entries = Object.entries(labels);
  if (entries.length === 0) return name;
  return `${name}{${entries.map(([k, v]) => `${k}="${v.replace(/["\\\n]/g, '_')}"`).join(',')}}`;
}
