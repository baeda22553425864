import { type EventBridgeClient, PutEventsCommand, type PutEventsRequestEntry } from '@aws-sdk/client-eventbridge';
import { LIFECYCLE_SOURCE, type LifecycleEvent, type LifecycleSink } from '../core/lifecycle.js';
import type { Logger } from '../observability/logger.js';

/**
 * Publishes lifecycle events to the broker's EventBridge bus with PutEvents: batches of 10 (the
 * API's limit), entries that fail individually (FailedEntryCount) retried with backoff, a request
 * that fails as a whole retried the same way. What still fails is logged, never thrown at callers.
 */

const BATCH = 10;
const ATTEMPTS = 4;

export class EventBridgePublisher implements LifecycleSink {
  readonly #client: EventBridgeClient;
  readonly #bus: string;
  readonly #logger: Logger;
  readonly #sleep: (ms: number) => Promise<void>;
  #queue: PutEventsRequestEntry[] = [];
  #flushing: Promise<void> = Promise.resolve();

  constructor(deps: { client: EventBridgeClient; bus: string; logger: Logger; sleep?: (ms: number) => Promise<void> }) {
    this.#client = deps.client;
    this.#bus = deps.bus;
    this.#logger = deps.logger;
    this.#sleep = deps.sleep ?? ((ms) => new Promise((r) => setTimeout(r, ms)));
  }

  publish(event: LifecycleEvent): void {
    const { type, time, ...detail } = event;
    this.#queue.push({
      Source: LIFECYCLE_SOURCE,
      DetailType: type,
      Detail: JSON.stringify(detail),
      EventBusName: this.#bus,
      Time: new Date(time),
    });
    if (this.#queue.length >= BATCH) void this.flush();
    else queueMicrotask(() => void this.flush());
  }

  flush(): Promise<void> {
    this.#flushing = this.#flushing.then(() => this.#drain());
    return this.#flushing;
  }

  async #drain(): Promise<void> {
    while (this.#queue.length > 0) {
      const batch = this.#queue.splice(0, BATCH);
      await this.#send(batch);
    }
  }

  async #send(entries: PutEventsRequestEntry[]): Promise<void> {
    let pending = entries;
    for (let attempt = 1; attempt <= ATTEMPTS && pending.length > 0; attempt++) {
      try {
        const out = await this.#client.send(new PutEventsCommand({ Entries: pending }));
        // Result entries line up with request entries; failed ones carry an ErrorCode.
        pending = pending.filter((_, i) => out.Entries?.[i]?.ErrorCode !== undefined);
        if (pending.length === 0) return;
        this.#logger.warn('lifecycle events partly rejected', {
          failed: pending.length,
          errorCodes: [...new Set(out.Entries?.map((e) => e.ErrorCode).filter((c) => c !== undefined))],
          attempt,
        });
      } catch (err) {
        this.#logger.warn('lifecycle events not published', { err: err as Error, attempt, count: pending.length });
      }
      if (attempt < ATTEMPTS) await this.#sleep(100 * 2 ** attempt);
    }
    if (pending.length > 0) {
      this.#logger.error('lifecycle events dropped after retries', {
        count: pending.length,
        detailTypes: pending.map((e) => e.DetailType),
      });
    }
  }
}
