/**
 * In-flight caps for webhook requests: at most `total` at once, and at most `perOrigin` to one
 * endpoint origin (scheme://host:port) however many subscriptions share it. Waiters queue first-in
 * first-out; a freed slot goes to the oldest waiter whose origin is under its cap, so one busy
 * origin cannot starve the others and no waiter is woken for nothing.
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
  readonly #byOrigin = new Map<string, number>();
  readonly #waiters: { readonly origin: string; readonly resolve: (granted: boolean) => void }[] = [];
  #inFlight = 0;
  #closed = false;

  constructor(limits: { total: number; perOrigin: number }) {
    if (!(limits.total >= 1 && limits.perOrigin >= 1)) throw new TypeError('limits must be at least 1');
    this.#total = limits.total;
    this.#perOrigin = limits.perOrigin;
  }

  /** Runs `fn` holding a slot for `origin`; throws LimiterClosedError once closed. */
  async run<T>(origin: string, fn: () => Promise<T>): Promise<T> {
    if (this.#closed) throw new LimiterClosedError();
    if (this.#canStart(origin)) this.#reserve(origin);
    // Otherwise whoever frees a slot reserves it for us before waking us (#wakeNext).
    else if (!(await new Promise<boolean>((resolve) => this.#waiters.push({ origin, resolve })))) {
      throw new LimiterClosedError();
    }
    try {
      return await fn();
    } finally {
      this.#release(origin);
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

  #canStart(origin: string): boolean {
    return this.#inFlight < this.#total && (this.#byOrigin.get(origin) ?? 0) < this.#perOrigin;
  }

  #reserve(origin: string): void {
    this.#inFlight++;
    this.#byOrigin.set(origin, (this.#byOrigin.get(origin) ?? 0) + 1);
  }

  #release(origin: string): void {
    this.#inFlight--;
    const left = (this.#byOrigin.get(origin) ?? 1) - 1;
    if (left === 0) this.#byOrigin.delete(origin);
    else this.#byOrigin.set(origin, left);
    this.#wakeNext();
  }

  #wakeNext(): void {
    if (this.#closed) return;
    const i = this.#waiters.findIndex((w) => this.#canStart(w.origin));
    if (i === -1) return;
    const [next] = this.#waiters.splice(i, 1);
    if (next === undefined) return;
    this.#reserve(next.origin);
    next.resolve(true);
  }
}
