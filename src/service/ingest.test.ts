import { describe, expect, it } from 'vitest';
import { eventLike } from '../../test/support/fhir-client.js';
import type { Notification, ResourceChange } from '../core/types.js';
import { silentLogger } from '../observability/logger.js';
import { Metrics } from '../observability/metrics.js';
import type { AcceptItem, AcceptOutcome, Store } from '../store/store.js';
import { IngestService } from './ingest.js';
import type { SubscriptionRegistry } from './subscription-registry.js';

/**
 * The group commit: requests that arrive while commits are in flight share the next one; at most
 * two commits are in flight; notifications reach the dispatcher in commit order; a failed commit
 * refuses its own requests only, and one that failed on an internal error, not the store's, is
 * tried again request by request.
 */

interface Call {
  readonly items: readonly AcceptItem[];
  readonly resolve: (outcomes: AcceptOutcome[]) => void;
  readonly reject: (err: Error) => void;
}

/** A store whose commits finish when the test says so. */
function controlledStore(): { store: Store; calls: Call[] } {
  const calls: Call[] = [];
  const store = {
    acceptChanges: (items: readonly AcceptItem[]) =>
      new Promise<AcceptOutcome[]>((resolve, reject) => calls.push({ items, resolve, reject })),
  } as unknown as Store;
  return { store, calls };
}

const event = (id: string, resourceId: string): unknown => eventLike('healthlake-update-patient', id, resourceId);

/**
 * Every change matches subscription `s1`; a committed item becomes one notification numbered by
 * order. `refresh`, when given, makes the store look like DynamoDB's (a type index to match with,
 * and a registry refresh between commit and hand-over).
 */
function setup(refresh?: (ids: readonly string[]) => Promise<void>) {
  const { store, calls } = controlledStore();
  if (refresh !== undefined) {
    (store as { candidatesFor?: Store['candidatesFor'] }).candidatesFor = async () => [
      { id: 's1', match: { resourceTypes: ['Patient'], interactions: ['create', 'update', 'delete'] } },
    ];
  }
  const enqueued: Notification[] = [];
  const registry = {
    match: () => ['s1'],
    // s1 as the registry holds it: no content filters, so the content stage reads nothing.
    get: () => ({ id: 's1', match: { resourceTypes: ['Patient'], interactions: ['create', 'update', 'delete'] } }),
    noteNotifications: () => undefined,
    refresh: refresh ?? (async () => undefined),
  } as unknown as SubscriptionRegistry;
  const ingest = new IngestService({
    store,
    registry,
    sink: { enqueue: (notes) => void enqueued.push(...notes) },
    clock: { now: () => Date.parse('2026-01-01T00:00:00Z') },
    logger: silentLogger,
    metrics: new Metrics(),
  });
  let number = 0;
  const answer = (call: Call): void =>
    call.resolve(
      call.items.map((item) => ({
        duplicate: false,
        notifications: [{ subscriptionId: 's1', eventNumber: ++number, change: item.change as ResourceChange }],
      })),
    );
  return { ingest, calls, enqueued, answer };
}

/** Lets the request reach the commit queue and the scheduled commit start (a few loop turns). */
async function tick(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
}

describe('IngestService group commit', () => {
  it('keeps at most two commits in flight and groups what waits into the next one', async () => {
    const { ingest, calls, enqueued, answer } = setup();
    const results = Array.from({ length: 6 }, (_, i) => ingest.ingest(event(`e${i}`, `p${i}`)));
    await tick();
    // All six arrived in the same turn: one commit holds them.
    expect(calls.map((c) => c.items.length)).toEqual([6]);
    const more = [ingest.ingest(event('e6', 'p6'))];
    await tick();
    expect(calls.map((c) => c.items.length)).toEqual([6, 1]);
    more.push(ingest.ingest(event('e7', 'p7')), ingest.ingest(event('e8', 'p8')));
    await tick();
    // Two in flight: the third waits, and grows, until one is answered.
    expect(calls.map((c) => c.items.length)).toEqual([6, 1]);
    answer(calls[0] as Call);
    await Promise.all(results);
    await tick();
    expect(calls.map((c) => c.items.length)).toEqual([6, 1, 2]);
    answer(calls[1] as Call);
    answer(calls[2] as Call);
    expect(await Promise.all(more)).toEqual(Array(3).fill({ accepted: 1, ignored: 0, duplicates: 0 }));
    expect(enqueued.map((n) => n.change.resourceId)).toEqual(['p0', 'p1', 'p2', 'p3', 'p4', 'p5', 'p6', 'p7', 'p8']);
    expect(enqueued.map((n) => n.eventNumber)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
  });

  it('refuses the requests of a failed commit only', async () => {
    const { ingest, calls, enqueued, answer } = setup();
    const first = ingest.ingest(event('e0', 'p0'));
    await tick();
    const second = ingest.ingest(event('e1', 'p1'));
    await tick();
    expect(calls).toHaveLength(2);
    (calls[0] as Call).reject(new Error('disk full'));
    answer(calls[1] as Call);
    await expect(first).rejects.toMatchObject({ code: 'STORE_UNAVAILABLE' });
    expect(await second).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    expect(enqueued.map((n) => n.change.resourceId)).toEqual(['p1']);
  });

  it('commits each request of a group alone when the group failed on an internal error, so only its own fails', async () => {
    const { ingest, calls, enqueued, answer } = setup();
    const good = ingest.ingest(event('e0', 'p0'));
    const bad = ingest.ingest(event('e1', 'p1'));
    const later = ingest.ingest(event('e2', 'p2'));
    const settled = Promise.allSettled([good, bad, later]);
    await tick();
    expect(calls.map((c) => c.items.length)).toEqual([3]);
    (calls[0] as Call).reject(new RangeError('Maximum call stack size exceeded'));
    await tick();
    // One request at a time, in order: the next goes once the one before is answered.
    expect(calls.map((c) => c.items.map((i) => i.change.eventId))).toEqual([['e0', 'e1', 'e2'], ['e0']]);
    answer(calls[1] as Call);
    await tick();
    (calls[2] as Call).reject(new RangeError('Maximum call stack size exceeded'));
    await tick();
    answer(calls[3] as Call);
    const [first, second, third] = await settled;
    expect(first).toEqual({ status: 'fulfilled', value: { accepted: 1, ignored: 0, duplicates: 0 } });
    expect(second).toMatchObject({ status: 'rejected', reason: { code: 'INTERNAL', status: 500 } });
    expect(third).toEqual({ status: 'fulfilled', value: { accepted: 1, ignored: 0, duplicates: 0 } });
    expect(calls.map((c) => c.items.map((i) => i.change.eventId))).toEqual([
      ['e0', 'e1', 'e2'],
      ['e0'],
      ['e1'],
      ['e2'],
    ]);
    expect(enqueued.map((n) => [n.change.resourceId, n.eventNumber])).toEqual([
      ['p0', 1],
      ['p2', 2],
    ]);
  });

  it('refuses every request of a group with STORE_UNAVAILABLE when the store fails, without trying again', async () => {
    const { ingest, calls } = setup();
    const results = Promise.allSettled([ingest.ingest(event('e0', 'p0')), ingest.ingest(event('e1', 'p1'))]);
    await tick();
    (calls[0] as Call).reject(Object.assign(new Error('disk I/O error'), { code: 'SQLITE_IOERR' }));
    const failure = { status: 'rejected', reason: expect.objectContaining({ code: 'STORE_UNAVAILABLE', status: 503 }) };
    expect(await results).toEqual([failure, failure]);
    expect(calls).toHaveLength(1);
  });

  it('hands notifications over in commit order even when a later request refreshes first', async () => {
    // The first request's registry refresh (a store read) is slow; any later one answers at once.
    let release = (): void => undefined;
    let refreshes = 0;
    const { ingest, calls, enqueued, answer } = setup(() =>
      ++refreshes === 1 ? new Promise<void>((resolve) => (release = resolve)) : Promise.resolve(),
    );
    const first = ingest.ingest(event('e0', 'p0'));
    await tick();
    const second = ingest.ingest(event('e1', 'p1'));
    await tick();
    answer(calls[0] as Call);
    answer(calls[1] as Call);
    await tick();
    // Event 2 is committed and its refresh would be quick, but event 1 is not handed over yet.
    expect(enqueued).toEqual([]);
    release();
    await Promise.all([first, second]);
    expect(enqueued.map((n) => [n.change.resourceId, n.eventNumber])).toEqual([
      ['p0', 1],
      ['p1', 2],
    ]);
  });

  it('answers for committed events even when the registry re-read fails, and still hands them over', async () => {
    const { ingest, calls, enqueued, answer } = setup(() => Promise.reject(new Error('throttled')));
    const result = ingest.ingest(event('e0', 'p0'));
    await tick();
    answer(calls[0] as Call);
    expect(await result).toEqual({ accepted: 1, ignored: 0, duplicates: 0 });
    expect(enqueued.map((n) => n.change.resourceId)).toEqual(['p0']);
  });
});
