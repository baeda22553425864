import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import type { LogLevel } from '../observability/logger.js';
import type { DeliveryUpdate } from '../store/store.js';
import { DeliveryStateLog } from './delivery-state-log.js';

const note = (eventNumber: number, over: Partial<DeliveryUpdate> = {}): DeliveryUpdate => ({
  subscriptionId: 's1',
  eventNumber,
  state: 'delivered',
  attempts: 1,
  dueAt: 1000 + eventNumber,
  ...over,
});

/** A store whose writes finish when the test says so, in any order. */
class HeldStore {
  readonly calls: DeliveryUpdate[][] = [];
  readonly written: number[][] = [];
  readonly #finish: ((err?: Error) => void)[] = [];

  recordDeliveries(updates: readonly DeliveryUpdate[]): Promise<void> {
    this.calls.push([...updates]);
    return new Promise((resolve, reject) => {
      this.#finish.push((err) => {
        if (err !== undefined) reject(err);
        else {
          this.written.push(updates.map((u) => u.eventNumber));
          resolve();
        }
      });
    });
  }

  finish(call: number, err?: Error): void {
    this.#finish[call]?.(err);
  }
}

const logged: { level: LogLevel; msg: string }[] = [];
const logger = {
  debug: (msg: string) => void logged.push({ level: 'debug', msg }),
  info: (msg: string) => void logged.push({ level: 'info', msg }),
  warn: (msg: string) => void logged.push({ level: 'warn', msg }),
  error: (msg: string) => void logged.push({ level: 'error', msg }),
};

beforeEach(() => {
  vi.useFakeTimers();
  logged.length = 0;
});
afterEach(() => {
  vi.useRealTimers();
});

describe('DeliveryStateLog', () => {
  it('writes the states of one delay window in one call, once the delay is over', async () => {
    const store = new HeldStore();
    const log = new DeliveryStateLog({ store, logger, delayMs: 10 });
    log.record(note(1));
    log.record(note(2, { state: 'pending', attempts: 2, dueAt: 5000, lastError: 'HTTP 503' }));
    await vi.advanceTimersByTimeAsync(9);
    expect(store.calls).toEqual([]);
    await vi.advanceTimersByTimeAsync(1);
    expect(store.calls).toEqual([
      [
        { subscriptionId: 's1', eventNumber: 1, state: 'delivered', attempts: 1, dueAt: 1001 },
        { subscriptionId: 's1', eventNumber: 2, state: 'pending', attempts: 2, dueAt: 5000, lastError: 'HTTP 503' },
      ],
    ]);
  });

  it('writes at once when a batch is full, without waiting for the delay', async () => {
    const store = new HeldStore();
    const log = new DeliveryStateLog({ store, logger, delayMs: 10, batch: 3 });
    for (const n of [1, 2, 3, 4]) log.record(note(n));
    await vi.advanceTimersByTimeAsync(0);
    expect(store.calls.map((c) => c.map((u) => u.eventNumber))).toEqual([[1, 2, 3]]);
    store.finish(0);
    await vi.advanceTimersByTimeAsync(10);
    expect(store.calls.map((c) => c.map((u) => u.eventNumber))).toEqual([[1, 2, 3], [4]]);
  });

  it('writes the states of one bundle in one call, even past a full batch', async () => {
    const store = new HeldStore();
    const log = new DeliveryStateLog({ store, logger, delayMs: 10, batch: 3 });
    log.record(note(1));
    log.record(note(2), note(3), note(4), note(5));
    log.record(note(6));
    await vi.advanceTimersByTimeAsync(0);
    // Not [1, 2, 3] then [4, 5, 6]: a crash between two writes would leave the bundle 2–5 half recorded.
    expect(store.calls.map((c) => c.map((u) => u.eventNumber))).toEqual([[1, 2, 3, 4, 5]]);
    store.finish(0);
    await vi.advanceTimersByTimeAsync(10);
    expect(store.calls.map((c) => c.map((u) => u.eventNumber))).toEqual([[1, 2, 3, 4, 5], [6]]);
  });

  it('hands a batch to the store only after the one before it is written', async () => {
    const store = new HeldStore();
    const log = new DeliveryStateLog({ store, logger, delayMs: 10 });
    log.record(note(1));
    void log.flush();
    log.record(note(2));
    const both = log.flush();
    await vi.advanceTimersByTimeAsync(0);
    expect(store.calls).toHaveLength(1);
    store.finish(0);
    await vi.advanceTimersByTimeAsync(0);
    expect(store.calls).toHaveLength(2);
    store.finish(1);
    await both;
    expect(store.written).toEqual([[1], [2]]);
  });

  it('logs a failed write and goes on with the next batch', async () => {
    const store = new HeldStore();
    const log = new DeliveryStateLog({ store, logger, delayMs: 10 });
    log.record(note(1));
    const first = log.flush();
    await vi.advanceTimersByTimeAsync(0);
    store.finish(0, new Error('disk full'));
    await first;
    expect(logged).toEqual([{ level: 'error', msg: 'could not record delivery states; they will be redelivered' }]);
    log.record(note(2));
    const second = log.flush();
    await vi.advanceTimersByTimeAsync(0);
    store.finish(1);
    await second;
    expect(store.written).toEqual([[2]]);
  });

  it('flushes nothing twice: a flush before the delay cancels the timed write', async () => {
    const store = new HeldStore();
    const log = new DeliveryStateLog({ store, logger, delayMs: 10 });
    log.record(note(1));
    void log.flush();
    expect(vi.getTimerCount()).toBe(0);
    await vi.advanceTimersByTimeAsync(50);
    expect(store.calls).toHaveLength(1);
  });

  it('writes what waits on close, then drops later states without touching the store', async () => {
    const store = new HeldStore();
    const log = new DeliveryStateLog({ store, logger, delayMs: 10 });
    log.record(note(1));
    const closed = log.close();
    await vi.advanceTimersByTimeAsync(0);
    store.finish(0);
    await closed;
    log.record(note(2));
    expect(vi.getTimerCount()).toBe(0);
    await vi.advanceTimersByTimeAsync(50);
    expect(store.written).toEqual([[1]]);
    expect(store.calls).toHaveLength(1);
  });
});
