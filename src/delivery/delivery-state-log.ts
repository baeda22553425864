import type { Logger } from '../observability/logger.js';
import type { DeliveryUpdate, Store } from '../store/store.js';

/**
 * Delivery states (delivered, retried, dead), written behind the attempts and batched: losing one
 * to a crash only means a redelivery. One write per `delayMs`, sooner once `batch` states wait,
 * not one per loop turn: under load the SQLite writer's time goes to event commits, which the 202s
 * wait for. Batches are written one after another, in the order they were taken.
 */
export class DeliveryStateLog {
  readonly #store: Pick<Store, 'recordDeliveries'>;
  readonly #logger: Logger;
  readonly #delayMs: number;
  readonly #batch: number;
  #waiting: DeliveryUpdate[] = [];
  #timer: NodeJS.Timeout | undefined;
  /** Tail of the writes handed to the store. */
  #written: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(deps: {
    store: Pick<Store, 'recordDeliveries'>;
    logger: Logger;
    /** At most this late (10 ms). */
    delayMs?: number;
    /** At most this many in one write (512). */
    batch?: number;
  }) {
    this.#store = deps.store;
    this.#logger = deps.logger;
    this.#delayMs = deps.delayMs ?? 10;
    this.#batch = deps.batch ?? 512;
  }

  /**
   * The states of one bundle (or one notification), written in one store write: a process killed
   * meanwhile never leaves part of a bundle recorded (SQLite: one transaction). After `close`,
   * dropped: the store may be closing, and an unrecorded state only means a redelivery.
   */
  record(...updates: DeliveryUpdate[]): void {
    if (this.#closed) return;
    for (const u of updates) this.#waiting.push(u);
    if (this.#waiting.length >= this.#batch) void this.flush();
    else this.#timer ??= setTimeout(() => void this.flush(), this.#delayMs);
  }

  /** Hands the waiting states to the store; resolves once they and every earlier batch are written. */
  flush(): Promise<void> {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const updates = this.#waiting;
    this.#waiting = [];
    if (updates.length > 0) {
      this.#written = this.#written
        .then(() => this.#store.recordDeliveries(updates))
        .catch((err: unknown) => {
          this.#logger.error('could not record delivery states; they will be redelivered', { err: err as Error });
        });
    }
    return this.#written;
  }

  /** Writes what waits and takes no more: an attempt that ends after this is redelivered on restart. */
  close(): Promise<void> {
    this.#closed = true;
    return this.flush();
  }
}
