/**
 * In-flight caps for webhook requests: at most `total` at once, at most `perOrigin` to one
 * endpoint origin (scheme://host:port) however many subscriptions share it, and at most `perOwner`
 * for one API client's subscriptions however many origins they name (origins are cheap: without
 * it, one client's endpoints that hang could hold every slot and stall every other client).
 * Waiters queue first-in first-out; a freed slot goes to the oldest waiter whose origin and owner
 * are under their caps, so one busy origin or client cannot starve the others and no waiter is
 * woken for nothing.
 */

/** The limiter was closed while a task waited: nothing may be sent. */
export class LimiterClosedError extends Error {
  constructor() {
    super('limiter closed');
    this.name = 'LimiterClosedError';
  }
}

export class OriginLimiter {
  readonly #total: number;
  readonly #perOrigin: number;
  readonly #perOwner: number;
  readonly #byOrigin = new Map<string, number>();
  readonly #byOwner = new Map<string, number>();
  readonly #waiters: {
    readonly origin: string;
    readonly owner: string;
    readonly resolve: (granted: boolean) => void;
  }[] = [];
  #inFlight = 0;
  #closed = false;

  /** `perOwner` absent: no cap per owner. */
  constructor(limits: { total: number; perOrigin: number; perOwner?: number }) {
    const perOwner = limits.perOwner ?? Number.POSITIVE_INFINITY;
    if (!(limits.total >= 1 && limits.perOrigin >= 1 && perOwner >= 1))
      throw new TypeError('limits must be at least 1');
    this.#total = limits.total;
    this.#perOrigin = limits.perOrigin;
    this.#perOwner = perOwner;
  }

  /** Runs `fn` holding a slot for `origin` and `owner`; throws LimiterClosedError once closed. */
  async run<T>(origin: string, fn: () => Promise<T>, owner = ''): Promise<T> {
    if (this.#closed) throw new LimiterClosedError();
    if (this.#canStart(origin, owner)) this.#reserve(origin, owner);
    // Otherwise whoever frees a slot reserves it for us before waking us (#wakeNext).
    else if (!(await new Promise<boolean>((resolve) => this.#waiters.push({ origin, owner, resolve })))) {
      throw new LimiterClosedError();
    }
    try {
      return await fn();
    } finally {
      this.#release(origin, owner);
    }
  }

  /** Refuse new work and wake every waiter without a slot. */
  close(): void {
    this.#closed = true;
    for (const w of this.#waiters.splice(0)) w.resolve(false);
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  get waiting(): number {
    return this.#waiters.length;
  }

  #canStart(origin: string, owner: string): boolean {
    return (
      this.#inFlight < this.#total &&
      (this.#byOrigin.get(origin) ?? 0) < this.#perOrigin &&
      (this.#byOwner.get(owner) ?? 0) < this.#perOwner
    );
  }

  #reserve(origin: string, owner: string): void {
    this.#inFlight++;
    this.#byOrigin.set(origin, (this.#byOrigin.get(origin) ?? 0) + 1);
    this.#byOwner.set(owner, (this.#byOwner.get(owner) ?? 0) + 1);
  }

  #release(origin: string, owner: string): void {
    this.#inFlight--;
    decrement(this.#byOrigin, origin);
    decrement(this.#byOwner, owner);
    this.#wakeNext();
  }

  #wakeNext(): void {
    if (this.#closed) return;
    const i = this.#waiters.findIndex((w) => this.#canStart(w.origin, w.owner));
    if (i === -1) return;
    const [next] = this.#waiters.splice(i, 1);
    if (next === undefined) return;
    this.#reserve(next.origin, next.owner);
    next.resolve(true);
  }
}

/** One fewer under `key`; the entry goes at 0 (the maps hold only what is in flight). */
function decrement(counts: Map<string, number>, key: string): void {
  const left = (counts.get(key) ?? 1) - 1;
  if (left === 0) counts.delete(key);
  else counts.set(key, left);
}
