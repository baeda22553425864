import { DeleteItemCommand, type DynamoDBClient, GetItemCommand, UpdateItemCommand } from '@aws-sdk/client-dynamodb';
import { describe, expect, it } from 'vitest';
import { DynamoDbStore } from '../src/store/dynamodb/dynamodb-store.js';
import { FENCE_MS, laneKey, VOID_AFTER_MS, voidNumbers } from '../src/store/dynamodb/lane-leases.js';
import { tableNames } from '../src/store/dynamodb/tables.js';
import type { LaneHeld, LaneHold } from '../src/store/store.js';
import { storePerTest } from './support/dynamodb-store-per-test.js';
import { item, RECEIVED } from './support/store-fixtures.js';

/**
 * The DynamoDB store's lane leases (one sender per subscription across Lambda containers) against
 * DynamoDB Local: who holds a lane, the request to read again, the watermark and its re-queue
 * epoch, and the lane read that stops below a number taken but not written (and voids it once
 * it is too old). The containers using them are in aws-containers.test.ts.
 */

let client: DynamoDBClient;
let prefix: string;
let store: DynamoDbStore;

storePerTest('lanes', (t) => {
  ({ client, prefix, store } = t);
});

const NOW = RECEIVED + 1_000;

/** The lease as taken (a test failure if another holds it, or it was lost). */
function hold(taken: LaneHold | LaneHeld | undefined): LaneHold {
  if (taken === undefined || !('through' in taken)) throw new Error(`not held: ${JSON.stringify(taken)}`);
  return taken;
}
const table = () => tableNames(prefix).notifications;
const leases = () => store.laneLeases;

/** Accepts `count` events for s1 (numbers 1..count), received at RECEIVED. */
async function accept(count: number, from = 0): Promise<number[]> {
  const outcomes = await store.acceptChanges(
    Array.from({ length: count }, (_, i) => item(`e-${from + i}`, ['s1'], `p-${from + i}`)),
    RECEIVED,
  );
  return outcomes.flatMap((o) => o.notifications.map((n) => n.eventNumber));
}

/** Dead-letters s1's notifications `numbers` (attempted three times, at NOW). */
async function deadLetter(...numbers: number[]): Promise<void> {
  await store.recordDeliveries(
    numbers.map((eventNumber) => ({
      subscriptionId: 's1',
      eventNumber,
      state: 'dead',
      attempts: 3,
      dueAt: NOW,
      lastError: 'HTTP 503',
    })),
  );
}

async function rowState(eventNumber: number): Promise<string | undefined> {
  const out = await client.send(
    new GetItemCommand({
      TableName: table(),
      Key: { subscriptionId: { S: 's1' }, eventNumber: { N: String(eventNumber) } },
      ConsistentRead: true,
    }),
  );
  return out.Item?.state?.S;
}

describe('who holds a lane', () => {
  it('one holder at a time; another asks it to read again, and it keeps the lane once for that', async () => {
    const a = await leases().take('s1', 'A', NOW, NOW + 60_000);
    expect(a).toEqual({ through: 0, epoch: 0 });
    expect(await leases().take('s1', 'B', NOW, NOW + 60_000)).toEqual({ heldUntil: NOW + 60_000 });
    // B asked: A's release keeps the lane and answers the hold to read again from.
    const again = await leases().release('s1', 'A', hold(a), 4, NOW + 60_000);
    expect(again).toEqual({ through: 4, epoch: 0 });
    expect(await leases().take('s1', 'B', NOW, NOW + 60_000)).toEqual({ heldUntil: NOW + 60_000 });
    const last = await leases().release('s1', 'A', hold(again), 5, NOW + 60_000);
    expect(last).toEqual({ through: 5, epoch: 0 });
    // Nobody asked since: let go, with the watermark.
    expect(await leases().release('s1', 'A', hold(last), 6, NOW + 60_000)).toBeUndefined();
    expect(await leases().take('s1', 'B', NOW, NOW + 60_000)).toEqual({ through: 6, epoch: 0 });
  });

  it('a lease that ran out is taken over: the old holder finds it lost and writes nothing', async () => {
    const a = await leases().take('s1', 'A', NOW, NOW + 10_000);
    const b = await leases().take('s1', 'B', NOW + 20_000, NOW + 80_000);
    expect(b).toEqual({ through: 0, epoch: 0 });
    expect(await leases().renew('s1', 'A', hold(a), 9, NOW + 90_000)).toBeUndefined();
    expect(await leases().release('s1', 'A', hold(a), 9, NOW + 90_000)).toBeUndefined();
    expect(await leases().release('s1', 'A', hold(a), 9)).toBeUndefined();
    // Still B's, its watermark untouched by A.
    expect(await leases().take('s1', 'C', NOW + 30_000, NOW + 90_000)).toEqual({ heldUntil: NOW + 80_000 });
    expect(await leases().renew('s1', 'B', hold(b), 2, NOW + 90_000)).toEqual({ through: 2, epoch: 0 });
  });

  it('a release without keeping lets go even when asked (the request waits for the next holder)', async () => {
    const a = await leases().take('s1', 'A', NOW, NOW + 60_000);
    expect(await leases().take('s1', 'B', NOW, NOW + 60_000)).toEqual({ heldUntil: NOW + 60_000 });
    expect(await leases().release('s1', 'A', hold(a), 3)).toBeUndefined();
    expect(await leases().take('s1', 'B', NOW, NOW + 60_000)).toEqual({ through: 3, epoch: 0 });
  });

  it('the lease item goes with its subscription and is never read as a notification', async () => {
    await accept(2);
    await leases().take('s1', 'A', NOW, NOW + 60_000);
    expect((await store.notificationsInRange('s1', 0, 10, 10)).map((n) => n.eventNumber)).toEqual([1, 2]);
    expect(await store.subscriptionsWithPending()).toEqual(['s1']);
    expect(await store.deleteSubscription('s1')).toBe(true);
    const lane = await client.send(
      new GetItemCommand({ TableName: table(), Key: laneKey('s1'), ConsistentRead: true }),
    );
    expect(lane.Item).toBeUndefined();
  });
});

describe('reading a lane', () => {
  it('moves the watermark over what is done and answers the pending notifications in order', async () => {
    await accept(4);
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: NOW },
      { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 3, dueAt: NOW, lastError: 'HTTP 503' },
      { subscriptionId: 's1', eventNumber: 4, state: 'delivered', attempts: 1, dueAt: NOW },
    ]);
    const read = await leases().read('s1', 0, 10, NOW);
    expect(read.through).toBe(2);
    expect(read.notes.map((n) => n.eventNumber)).toEqual([3]);
    expect(read.voidableAt).toBeUndefined();
    // Limited, from a watermark.
    await accept(3, 10);
    const limited = await leases().read('s1', 2, 2, NOW);
    expect(limited.notes.map((n) => n.eventNumber)).toEqual([3, 5]);
  });

  it('reads a pending row at or below the watermark as delivered: its own write failed after the lane moved past it', async () => {
    await accept(3);
    // Number 2's attempt failed once; then it was delivered, but that write was lost (a throttle:
    // the state log only logs it), and the holder let go with the lane past 1 and 2.
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: NOW },
      { subscriptionId: 's1', eventNumber: 2, state: 'pending', attempts: 1, dueAt: NOW, lastError: 'HTTP 503' },
    ]);
    const a = hold(await leases().take('s1', 'A', NOW, NOW + 60_000));
    expect(await leases().release('s1', 'A', a, 2, NOW + 60_000)).toBeUndefined();
    expect(await rowState(2)).toBe('pending');
    const states = (await store.notificationsInRange('s1', 1, 3, 10)).map((n) => [
      n.eventNumber,
      n.state,
      n.attempts,
      n.lastError,
    ]);
    expect(states).toEqual([
      [1, 'delivered', 1, undefined],
      [2, 'delivered', 1, undefined],
      [3, 'pending', 0, undefined],
    ]);
  });

  it('stops below a number taken but not written, and voids it once the notification above is old enough', async () => {
    expect(await accept(3)).toEqual([1, 2, 3]);
    // Number 2 taken by an acceptance that has not written it (yet, or ever).
    await client.send(
      new DeleteItemCommand({ TableName: table(), Key: { subscriptionId: { S: 's1' }, eventNumber: { N: '2' } } }),
    );
    const young = await leases().read('s1', 0, 10, RECEIVED + VOID_AFTER_MS - 1);
    expect(young.notes.map((n) => n.eventNumber)).toEqual([1]);
    expect(young.voidableAt).toBe(RECEIVED + VOID_AFTER_MS);
    expect(await rowState(2)).toBeUndefined();

    const old = await leases().read('s1', 0, 10, RECEIVED + VOID_AFTER_MS + 1);
    expect(old.notes.map((n) => n.eventNumber)).toEqual([1, 3]);
    expect(old.voidableAt).toBeUndefined();
    expect(await rowState(2)).toBe('void');
    // No notification for $events, none pending, and the purge takes it with the done ones.
    expect((await store.notificationsInRange('s1', 1, 3, 10)).map((n) => n.eventNumber)).toEqual([1, 3]);
    expect((await store.pendingNotifications('s1', 0, 10)).map((n) => n.eventNumber)).toEqual([1, 3]);
    expect((await store.purge(RECEIVED + VOID_AFTER_MS + 2)).notifications).toBe(1);
    expect(await rowState(2)).toBeUndefined();
  });

  it('an acceptance whose number was voided takes the next one', async () => {
    await accept(1);
    // Number 2 voided before its acceptance wrote it: the acceptance gets 3.
    expect(await voidNumbers(client, table(), 's1', [2], NOW)).toBe(true);
    expect(await accept(1, 5)).toEqual([3]);
    expect(await rowState(2)).toBe('void');
    // A void never replaces a notification.
    expect(await voidNumbers(client, table(), 's1', [3], NOW)).toBe(false);
    expect(await rowState(3)).toBe('pending');
  });
});

describe('re-queueing a lane', () => {
  it('fences the lane while it re-queues: its holder lets go at its next renew, nobody takes it until the re-activation is written, then it is read from the lowered watermark', async () => {
    await accept(3);
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: NOW },
      { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 3, dueAt: NOW, lastError: 'HTTP 503' },
      { subscriptionId: 's1', eventNumber: 3, state: 'delivered', attempts: 1, dueAt: NOW },
    ]);
    // A let go at watermark 3 before, and holds the lane again.
    expect(
      await leases().release('s1', 'A', hold(await leases().take('s1', 'A', NOW, NOW + 60_000)), 3),
    ).toBeUndefined();
    const a = await leases().take('s1', 'A', NOW, NOW + 60_000);
    expect(a).toEqual({ through: 3, epoch: 0 });
    expect(await store.requeueDeadLetters('s1', NOW)).toBe(1);
    // A still holds it (nobody else can start while A may be sending): B asks in vain.
    const fenced = { heldUntil: NOW + FENCE_MS, requeuing: true };
    expect(await leases().take('s1', 'B', NOW + 1_000, NOW + 60_000)).toEqual(fenced);
    // A's renew learns that a re-queue is under way, and lets go; its release finds it gone.
    expect(await leases().renew('s1', 'A', hold(a), 3, NOW + 60_000, NOW + 1_000)).toEqual(fenced);
    expect(await leases().release('s1', 'A', hold(a), 3, NOW + 60_000, NOW + 1_000)).toBeUndefined();
    expect(await leases().take('s1', 'B', NOW + 1_000, NOW + 60_000)).toEqual(fenced);
    // Only the re-queue that made the fence lifts it.
    await store.requeueSettled('s1', NOW + 1);
    expect(await leases().take('s1', 'B', NOW + 1_000, NOW + 60_000)).toEqual(fenced);
    // Written: B takes it, three epochs on (the fence, the lowered watermark, the fence lifted), from 1.
    await store.requeueSettled('s1', NOW);
    const b = await leases().take('s1', 'B', NOW + 2_000, NOW + 60_000);
    expect(b).toEqual({ through: 1, epoch: 3 });
    const read = await leases().read('s1', hold(b).through, 10, NOW);
    expect(read.notes.map((n) => n.eventNumber)).toEqual([2]);
    expect(read.through).toBe(1);
    // Again while B holds it, B renewing only once it is written: B goes on from the lowered watermark.
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 3, dueAt: NOW, lastError: 'HTTP 503' },
    ]);
    expect(await store.requeueDeadLetters('s1', NOW + 3_000)).toBe(1);
    await store.requeueSettled('s1', NOW + 3_000);
    // (Settled twice, as a retried re-activation may: nothing more moves.)
    await store.requeueSettled('s1', NOW + 3_000);
    expect(await leases().renew('s1', 'B', hold(b), 3, NOW + 95_000, NOW + 4_000)).toEqual({ through: 1, epoch: 6 });
  });

  it('a holder that lost its lease, then was re-queued, counts its attempt as one the re-queue started over', async () => {
    await accept(1);
    const a = hold(await leases().take('s1', 'A', NOW, NOW + 10_000));
    expect(await leases().take('s1', 'B', NOW + 20_000, NOW + 80_000)).toEqual({ through: 0, epoch: 0 });
    // Lost, no re-queue: plainly lost.
    expect(await leases().renew('s1', 'A', a, 0, NOW + 90_000, NOW + 30_000)).toBeUndefined();
    await store.requeueDeadLetters('s1', NOW + 30_000);
    expect(await leases().renew('s1', 'A', a, 0, NOW + 90_000, NOW + 31_000)).toEqual({
      heldUntil: 0,
      requeuing: true,
    });
  });

  // Epochs: two fences, two re-queues, and a lift per fence (two tokens; the same instance shares one).
  it.each([
    ['another instance', () => new DynamoDbStore(client, prefix), 6],
    ['the same instance', () => store, 5],
  ])(
    'keeps the lane fenced until both re-queues fenced in the same millisecond are settled (the second by %s)',
    async (_by, second, epoch) => {
      await accept(1);
      await deadLetter(1);
      const other = second();
      expect(await store.requeueDeadLetters('s1', NOW)).toBe(1);
      expect(await other.requeueDeadLetters('s1', NOW)).toBe(0);
      // The first one settles while the second is still under way: the second's fence stands.
      await store.requeueSettled('s1', NOW);
      expect(await leases().take('s1', 'B', NOW + 1_000, NOW + 60_000)).toEqual({
        heldUntil: NOW + FENCE_MS,
        requeuing: true,
      });
      // The second lift ends the fence.
      await other.requeueSettled('s1', NOW);
      expect(await leases().take('s1', 'B', NOW + 1_000, NOW + 60_000)).toEqual({ through: 0, epoch });
    },
  );

  it('keeps the lane fenced while the first of two re-queues is under way, though the second settled first', async () => {
    await accept(1);
    await deadLetter(1);
    const other = new DynamoDbStore(client, prefix);
    expect(await store.requeueDeadLetters('s1', NOW)).toBe(1);
    expect(await other.requeueDeadLetters('s1', NOW + 10)).toBe(0);
    await other.requeueSettled('s1', NOW + 10);
    expect(await leases().take('s1', 'B', NOW + 1_000, NOW + 60_000)).toEqual({
      heldUntil: NOW + 10 + FENCE_MS,
      requeuing: true,
    });
    await store.requeueSettled('s1', NOW);
    expect(await leases().take('s1', 'B', NOW + 1_000, NOW + 60_000)).toMatchObject({ through: 0 });
  });

  it('makes a stale fence anew without the tokens of the re-queues that let it go stale', async () => {
    await accept(1);
    await deadLetter(1);
    // A re-queue whose instance died: its token stays in the set, its fence goes stale.
    const dead = new DynamoDbStore(client, prefix);
    expect(await dead.requeueDeadLetters('s1', NOW)).toBe(1);
    const later = NOW + FENCE_MS + 1;
    expect(await store.requeueDeadLetters('s1', later)).toBe(0);
    expect(await leases().take('s1', 'B', later + 1, later + 60_000)).toEqual({
      heldUntil: later + FENCE_MS,
      requeuing: true,
    });
    // Lifted by its own settle alone: the dead re-queue's token went with the stale fence.
    await store.requeueSettled('s1', later);
    expect(await leases().take('s1', 'B', later + 1, later + 60_000)).toMatchObject({ through: 0 });
  });

  it('a re-queue still resetting rows after FENCE_MS keeps its fence fresh; its settle lifts it', async () => {
    await accept(2);
    await deadLetter(1, 2);
    let now = NOW;
    let release = () => {};
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    let resetting = () => {};
    const reached = new Promise<void>((resolve) => {
      resetting = resolve;
    });
    let refreshedAt = (_at: number) => {};
    let refreshes = 0;
    // Row resets wait for `release`; the lease item's writes go through, but for the first refresh,
    // which fails (and is tried again).
    const slow = {
      send: async (command: Parameters<DynamoDBClient['send']>[0]) => {
        if (!(command instanceof UpdateItemCommand)) return client.send(command);
        if (command.input.Key?.eventNumber?.N !== '0') {
          resetting();
          await released;
          return client.send(command);
        }
        if (command.input.UpdateExpression !== 'SET #fence = :now') return client.send(command);
        if (++refreshes === 1) throw new Error('socket hang up');
        const out = await client.send(command);
        refreshedAt(Number(command.input.ExpressionAttributeValues?.[':now']?.N));
        return out;
      },
    } as unknown as DynamoDBClient;
    const requeuer = new DynamoDbStore(slow, prefix, { clock: { now: () => now }, fenceRefreshMs: 10 });
    const freshAt = (at: number) =>
      new Promise<void>((resolve) => {
        refreshedAt = (fresh) => {
          if (fresh === at) resolve();
        };
      });

    const requeue = requeuer.requeueDeadLetters('s1', NOW);
    await reached;
    const fresh = freshAt(NOW + FENCE_MS);
    now = NOW + FENCE_MS;
    await fresh;
    // FENCE_MS after the fence was made, still resetting: still fenced.
    expect(await leases().take('s1', 'B', NOW + FENCE_MS + 1, NOW + FENCE_MS + 60_000)).toEqual({
      heldUntil: NOW + 2 * FENCE_MS,
      requeuing: true,
    });
    release();
    expect(await requeue).toBe(2);
    await requeuer.requeueSettled('s1', NOW);
    expect(await leases().take('s1', 'B', NOW + FENCE_MS + 1, NOW + FENCE_MS + 60_000)).toEqual({
      through: 0,
      epoch: 3,
    });
  }, 5_000);

  it('a fence whose re-activation never said it was written runs out after FENCE_MS', async () => {
    await accept(1);
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'dead', attempts: 3, dueAt: NOW, lastError: 'HTTP 503' },
    ]);
    // No lane was ever held: the fence is made all the same, so none starts meanwhile.
    expect(await store.requeueDeadLetters('s1', NOW)).toBe(1);
    expect(await leases().take('s1', 'A', NOW + FENCE_MS - 1, NOW + FENCE_MS + 60_000)).toEqual({
      heldUntil: NOW + FENCE_MS,
      requeuing: true,
    });
    // (Two epochs: the fence, and the re-queue's own once its rows were reset.)
    expect(await leases().take('s1', 'A', NOW + FENCE_MS + 1, NOW + FENCE_MS + 60_000)).toEqual({
      through: 0,
      epoch: 2,
    });
    expect((await leases().read('s1', 0, 10, NOW)).notes.map((n) => n.eventNumber)).toEqual([1]);
  });

  it('a holder that lets go without keeping, after a re-queue, leaves the lowered watermark', async () => {
    await accept(2);
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'dead', attempts: 3, dueAt: NOW, lastError: 'HTTP 503' },
      { subscriptionId: 's1', eventNumber: 2, state: 'delivered', attempts: 1, dueAt: NOW },
    ]);
    const a = await leases().take('s1', 'A', NOW, NOW + 60_000);
    await store.requeueDeadLetters('s1', NOW);
    expect(await leases().release('s1', 'A', hold(a), 2)).toBeUndefined();
    await store.requeueSettled('s1', NOW);
    expect(await leases().take('s1', 'B', NOW, NOW + 60_000)).toEqual({ through: 0, epoch: 3 });
  });

  it("an attempt's failure recorded after a re-queue it began before leaves the re-queue's reset", async () => {
    await accept(3);
    const a = hold(await leases().take('s1', 'A', NOW, NOW + 60_000));
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 1, state: 'dead', attempts: 2, dueAt: NOW, lastError: 'HTTP 503' },
      { subscriptionId: 's1', eventNumber: 2, state: 'pending', attempts: 1, dueAt: NOW + 5_000, laneEpoch: a.epoch },
    ]);
    expect(await store.requeueDeadLetters('s1', NOW + 1_000)).toBe(1);
    // A's attempts at 2 and 3 began before the re-queue and fail after it: a dead letter and a retry.
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 2, state: 'dead', attempts: 2, dueAt: NOW + 6_000, laneEpoch: a.epoch },
      { subscriptionId: 's1', eventNumber: 3, state: 'pending', attempts: 1, dueAt: NOW + 9_000, laneEpoch: a.epoch },
    ]);
    const read = await leases().read('s1', 0, 10, NOW + 2_000);
    expect(read.notes.map((n) => [n.eventNumber, n.state, n.attempts, n.dueAt])).toEqual([
      [1, 'pending', 0, NOW + 1_000],
      [2, 'pending', 0, NOW + 1_000],
      // Never attempted when the re-queue came: as accepted.
      [3, 'pending', 0, RECEIVED],
    ]);
    // At the lane's epoch now, the same outcome is written.
    await store.requeueSettled('s1', NOW + 1_000);
    const now = hold(await leases().take('s1', 'A', NOW + 2_000, NOW + 60_000));
    await store.recordDeliveries([
      { subscriptionId: 's1', eventNumber: 3, state: 'pending', attempts: 1, dueAt: NOW + 9_000, laneEpoch: now.epoch },
    ]);
    expect((await leases().read('s1', 0, 10, NOW + 2_000)).notes.map((n) => n.attempts)).toEqual([0, 0, 1]);
  });
});
