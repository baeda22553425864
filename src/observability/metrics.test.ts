import { describe, expect, it } from 'vitest';
import { EMF_NAMESPACE, Metrics } from './metrics.js';

/** CloudWatch Embedded Metric Format lines: what was counted since the last report, per series. */

interface Emf {
  readonly _aws: {
    readonly Timestamp: number;
    readonly CloudWatchMetrics: readonly {
      readonly Namespace: string;
      readonly Dimensions: readonly (readonly string[])[];
      readonly Metrics: readonly { readonly Name: string; readonly Unit: string }[];
    }[];
  };
  readonly [key: string]: unknown;
}

const parse = (lines: readonly string[]): Emf[] => lines.map((l) => JSON.parse(l) as Emf);

describe('Metrics.emf', () => {
  it('reports each counter series as its own metric with its labels as dimensions, then only what is new', () => {
    const m = new Metrics();
    m.inc('broker_events_total', { outcome: 'accepted' }, 3);
    m.inc('broker_events_total', { outcome: 'ignored' });
    const first = parse(m.emf({ Function: 'events' }, 1_700_000_000_000));
    expect(first).toEqual([
      {
        _aws: {
          Timestamp: 1_700_000_000_000,
          CloudWatchMetrics: [
            {
              Namespace: EMF_NAMESPACE,
              Dimensions: [['Function', 'outcome']],
              Metrics: [{ Name: 'broker_events_total', Unit: 'Count' }],
            },
          ],
        },
        Function: 'events',
        outcome: 'accepted',
        broker_events_total: 3,
      },
      expect.objectContaining({ outcome: 'ignored', broker_events_total: 1 }),
    ]);
    // Nothing new: nothing to report. Then only the rise since.
    expect(m.emf({ Function: 'events' }, 1)).toEqual([]);
    m.inc('broker_events_total', { outcome: 'accepted' }, 2);
    expect(parse(m.emf({ Function: 'events' }, 2))).toEqual([
      expect.objectContaining({ outcome: 'accepted', broker_events_total: 2 }),
    ]);
  });

  it('reports the latency histogram as values (bucket bounds) and counts observed since the last report', async () => {
    const m = new Metrics();
    for (const s of [0.0005, 0.003, 0.004, 0.2, 30]) m.observe('broker_delivery_latency_seconds', s);
    const [first] = parse(m.emf({ Function: 'dispatch' }, 1));
    expect(first?._aws.CloudWatchMetrics[0]?.Metrics).toEqual([
      { Name: 'broker_delivery_latency_seconds', Unit: 'Seconds' },
    ]);
    expect(first?._aws.CloudWatchMetrics[0]?.Dimensions).toEqual([['Function']]);
    expect(first?.broker_delivery_latency_seconds).toEqual({
      Values: [0.001, 0.005, 0.25, 30],
      Counts: [1, 2, 1, 1],
      Count: 5,
      Sum: 0.0005 + 0.003 + 0.004 + 0.2 + 30,
      Min: 0.0005,
      Max: 30,
    });
    m.observe('broker_delivery_latency_seconds', 0.004);
    const [second] = parse(m.emf({ Function: 'dispatch' }, 2));
    expect(second?.broker_delivery_latency_seconds).toEqual({
      Values: [0.005],
      Counts: [1],
      Count: 1,
      Sum: expect.closeTo(0.004, 9),
      Min: 0.004,
      Max: 0.004,
    });
    expect(m.emf({ Function: 'dispatch' }, 3)).toEqual([]);
    expect(await m.render()).toContain('broker_delivery_latency_seconds_count 6');
  });
});

describe('Metrics.render', () => {
  const samples = (text: string) => text.split('\n').filter((l) => l !== '' && !l.startsWith('#'));

  it('renders a labeled gauge as one series per label value, read at each render', async () => {
    const metrics = new Metrics();
    let counts: Record<string, number> = { active: 2, error: 0 };
    metrics.labeledGauge('broker_subscriptions_by_status', 'status', () => counts);
    const text = await metrics.render();
    expect(text).toContain('# TYPE broker_subscriptions_by_status gauge');
    expect(samples(text).filter((l) => l.startsWith('broker_subscriptions_by_status'))).toEqual([
      'broker_subscriptions_by_status{status="active"} 2',
      'broker_subscriptions_by_status{status="error"} 0',
    ]);
    counts = { active: 1, error: 1 };
    expect(await metrics.render()).toContain('broker_subscriptions_by_status{status="error"} 1');
  });

  it('shows the known counter series and the latency histogram at 0 before anything counted', async () => {
    const text = await new Metrics().render();
    expect(samples(text)).toEqual(
      expect.arrayContaining([
        'broker_events_total{outcome="accepted"} 0',
        'broker_events_total{outcome="refused"} 0',
        'broker_unusable_writes_total 0',
        'broker_notifications_total{outcome="dead-lettered"} 0',
        'broker_handshakes_total{outcome="retried"} 0',
        'broker_handshakes_total{outcome="failed"} 0',
        'broker_origin_pauses_total 0',
        'broker_heartbeats_total{outcome="refused"} 0',
        'broker_delivery_latency_seconds_bucket{le="+Inf"} 0',
        'broker_delivery_latency_seconds_count 0',
      ]),
    );
    // Each series once; nothing is sent to CloudWatch for a series that never counted.
    expect(new Set(samples(text).map((l) => l.split(' ')[0])).size).toBe(samples(text).length);
    expect(new Metrics().emf({ Function: 'api' }, 0)).toEqual([]);
  });

  it('shows a series that counted with its count, once', async () => {
    const m = new Metrics();
    m.inc('broker_unusable_writes_total');
    m.inc('broker_events_total', { outcome: 'refused' }, 2);
    const lines = samples(await m.render());
    expect(lines.filter((l) => l.startsWith('broker_unusable_writes_total'))).toEqual([
      'broker_unusable_writes_total 1',
    ]);
    expect(lines.filter((l) => l.startsWith('broker_events_total{outcome="refused"}'))).toEqual([
      'broker_events_total{outcome="refused"} 2',
    ]);
  });
});
