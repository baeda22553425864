/**
 * In-flight caps for webhook requests: at most `total` at once, at most `perOrigin` to one
 * endpoint origin (scheme://host:port) however many subscriptions share it, and at most `perOwner`
 * for one API client's subscriptions however many origins they name (origins are cheap: without
 * it, one client's endpoints that hang could hold every slot and stall every other client).
 *
 * Who gets a freed slot, so that no busy origin or client starves the others:
 * - at an origin that was full, the owner with the fewest requests in flight there (ties: the one
 *   waiting longest). A client whose endpoints hang cannot keep another client's requests to the
 *   same host:port waiting behind all of its own, yet a client alone at an origin still gets all
 *   of its slots;
 * - an owner that was at its cap: its waiter at the next of its origins with room;
 * - when the total cap held them: the origins with waiters take turns (round robin).
 * One owner's waiters at one origin go first-in first-out. A slot is reserved for a waiter before
 * it wakes, and none is woken for nothing.
 *
 * Waiters queue per (origin, owner), and a release looks only where it made room: one at an
 * origin, for an owner and under a total that were all below their caps wakes nobody and looks at
 * nothing, however many wait elsewhere; one at a full origin looks at each owner waiting there; an
 * owner reaching or leaving its cap, at each origin it waits at.
 */

/** An endpoint's origin (scheme://host:port, as URL normalizes it): what the caps and the sender threads count by. */
export function originOf(endpoint: string | undefined): string {
  try {
    return endpoint === undefined ? '' : new URL(endpoint).origin;
  } catch {
    return endpoint ?? '';
  }
}

/** The limiter was closed while a task waited: nothing may be sent. */
export class LimiterClosedError extends Error {
  constructor() {
    super('limiter closed');
    this.name = 'LimiterClosedError';
  }
}

interface Waiter {
  readonly resolve: (granted: boolean) => void;
  /** Order of arrival: of owners with as many in flight at an origin, the one waiting longest goes first. */
  readonly seq: number;
  next: Waiter | undefined;
}

/** One owner at one origin: its requests in flight there and its waiters there, oldest first. */
interface Share {
  readonly origin: OriginState;
  readonly owner: OwnerState;
  inFlight: number;
  head: Waiter | undefined;
  tail: Waiter | undefined;
}

interface OriginState {
  readonly key: string;
  inFlight: number;
  /** Per owner with requests in flight or waiting here. */
  readonly shares: Map<string, Share>;
  /** The shares with waiters. */
  readonly waiting: Set<Share>;
  /** Of `waiting`, those whose owner is under its cap; while above 0 the origin is in `#open`. */
  open: number;
}

interface OwnerState {
  readonly key: string;
  inFlight: number;
  /** Its shares with waiters, in the order its origins take turns. */
  readonly waiting: Set<Share>;
}

export class OriginLimiter {
  readonly #total: number;
  readonly #perOrigin: number;
  readonly #perOwner: number;
  /** Origins and owners with requests in flight or waiting (none kept beyond that). */
  readonly #origins = new Map<string, OriginState>();
  readonly #owners = new Map<string, OwnerState>();
  /** Origins with a waiter whose owner is under its cap, in the order they take turns for a slot the total cap held. */
  readonly #open = new Set<OriginState>();
  #inFlight = 0;
  #waiting = 0;
  #arrivals = 0;
  #examined = 0;
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
    const share = this.#share(origin, owner);
    if (this.#canStart(share)) this.#reserve(share);
    // Otherwise whoever frees a slot reserves it for us before waking us (#wake).
    else if (!(await new Promise<boolean>((resolve) => this.#enqueue(share, resolve)))) {
      throw new LimiterClosedError();
    }
    try {
      return await fn();
    } finally {
      this.#release(share);
    }
  }

  /** Refuse new work and wake every waiter without a slot. */
  close(): void {
    this.#closed = true;
    for (const origin of this.#origins.values()) {
      for (const share of origin.waiting) {
        for (let w = share.head; w !== undefined; w = w.next) w.resolve(false);
        share.head = undefined;
        share.tail = undefined;
        if (share.inFlight === 0) origin.shares.delete(share.owner.key);
      }
      origin.waiting.clear();
      origin.open = 0;
      if (origin.shares.size === 0) this.#origins.delete(origin.key);
    }
    for (const owner of this.#owners.values()) {
      owner.waiting.clear();
      if (owner.inFlight === 0) this.#owners.delete(owner.key);
    }
    this.#open.clear();
    this.#waiting = 0;
  }

  get inFlight(): number {
    return this.#inFlight;
  }

  get waiting(): number {
    return this.#waiting;
  }

  /** Waiting queues looked at so far to choose whom to wake: what releases cost (a seam for tests). */
  get examined(): number {
    return this.#examined;
  }

  #share(originKey: string, ownerKey: string): Share {
    let origin = this.#origins.get(originKey);
    if (origin === undefined) {
      origin = { key: originKey, inFlight: 0, shares: new Map(), waiting: new Set(), open: 0 };
      this.#origins.set(originKey, origin);
    }
    let share = origin.shares.get(ownerKey);
    if (share === undefined) {
      let owner = this.#owners.get(ownerKey);
      if (owner === undefined) {
        owner = { key: ownerKey, inFlight: 0, waiting: new Set() };
        this.#owners.set(ownerKey, owner);
      }
      share = { origin, owner, inFlight: 0, head: undefined, tail: undefined };
      origin.shares.set(ownerKey, share);
    }
    return share;
  }

  #canStart(share: Share): boolean {
    return (
      this.#inFlight < this.#total && share.origin.inFlight < this.#perOrigin && share.owner.inFlight < this.#perOwner
    );
  }

  #enqueue(share: Share, resolve: (granted: boolean) => void): void {
    const waiter: Waiter = { resolve, seq: this.#arrivals++, next: undefined };
    if (share.tail === undefined) {
      share.head = waiter;
      share.origin.waiting.add(share);
      share.owner.waiting.add(share);
      if (share.owner.inFlight < this.#perOwner) this.#opened(share.origin);
    } else share.tail.next = waiter;
    share.tail = waiter;
    this.#waiting++;
  }

  #reserve(share: Share): void {
    this.#inFlight++;
    share.origin.inFlight++;
    share.inFlight++;
    const owner = share.owner;
    // At its cap now: its waiters no longer make their origins open.
    if (++owner.inFlight === this.#perOwner && owner.waiting.size > 0) {
      for (const s of owner.waiting) {
        this.#examined++;
        this.#shut(s.origin);
      }
    }
  }

  #release(share: Share): void {
    const { origin, owner } = share;
    // Only waiters held by a cap this release brings under it may start now; the others stay put.
    const totalWasFull = this.#inFlight-- === this.#total;
    const originWasFull = origin.inFlight-- === this.#perOrigin;
    const ownerWasFull = owner.inFlight-- === this.#perOwner;
    share.inFlight--;
    if (ownerWasFull) {
      for (const s of owner.waiting) {
        this.#examined++;
        this.#opened(s.origin);
      }
    }
    if (this.#waiting > 0) {
      if (totalWasFull) this.#serveAny();
      else {
        // One slot freed at the origin and one for the owner: each may go to a different waiter.
        if (originWasFull) this.#serveOrigin(origin);
        if (ownerWasFull && owner.inFlight < this.#perOwner) this.#serveOwner(owner);
      }
    }
    this.#forget(share);
  }

  /** The slot the total cap held: to the next origin, in turn, with room and an owner who may start. */
  #serveAny(): void {
    // The origins at their cap skipped here are few: at most total / perOrigin.
    for (const origin of this.#open) {
      this.#examined++;
      if (origin.inFlight < this.#perOrigin) {
        this.#open.delete(origin);
        this.#open.add(origin);
        this.#serveOrigin(origin);
        return;
      }
    }
  }

  /** A slot at `origin`: to the owner under its cap with the fewest in flight there, then the longest waiting. */
  #serveOrigin(origin: OriginState): void {
    if (origin.open === 0) return;
    let best: Share | undefined;
    for (const s of origin.waiting) {
      this.#examined++;
      if (s.owner.inFlight >= this.#perOwner) continue;
      if (
        best === undefined ||
        s.inFlight < best.inFlight ||
        (s.inFlight === best.inFlight && (s.head as Waiter).seq < (best.head as Waiter).seq)
      ) {
        best = s;
      }
    }
    if (best !== undefined) this.#wake(best);
  }

  /**
   * A slot for `owner`: to its waiter at the next of its origins with room. The others waiting
   * there are held by their own caps (the origin and the total have room), so this is their turn too.
   */
  #serveOwner(owner: OwnerState): void {
    // Its origins at their cap skipped here are few: at most total / perOrigin.
    for (const s of owner.waiting) {
      this.#examined++;
      if (s.origin.inFlight < this.#perOrigin) {
        owner.waiting.delete(s);
        owner.waiting.add(s);
        this.#wake(s);
        return;
      }
    }
  }

  /** Reserve a slot for the oldest waiter of `share` (which may start), then wake it. */
  #wake(share: Share): void {
    const waiter = share.head as Waiter;
    share.head = waiter.next;
    if (share.head === undefined) {
      share.tail = undefined;
      share.origin.waiting.delete(share);
      share.owner.waiting.delete(share);
      if (share.owner.inFlight < this.#perOwner) this.#shut(share.origin);
    }
    this.#waiting--;
    this.#reserve(share);
    waiter.resolve(true);
  }

  #opened(origin: OriginState): void {
    if (origin.open++ === 0) this.#open.add(origin);
  }

  #shut(origin: OriginState): void {
    if (--origin.open === 0) this.#open.delete(origin);
  }

  /** Drop what holds nothing and waits for nothing (the maps hold only what is in flight or waiting). */
  #forget(share: Share): void {
    if (share.inFlight > 0 || share.head !== undefined) return;
    const { origin, owner } = share;
    origin.shares.delete(owner.key);
    if (origin.shares.size === 0) this.#origins.delete(origin.key);
    if (owner.inFlight === 0 && owner.waiting.size === 0) this.#owners.delete(owner.key);
  }
}
