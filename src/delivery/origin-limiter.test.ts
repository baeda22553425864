import { describe, expect, it } from 'vitest';
import { LimiterClosedError, OriginLimiter } from './origin-limiter.js';

/** A task that runs until the test releases it. */
function gate(): { promise: Promise<void>; open: () => void } {
  let open = (): void => {};
  const promise = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { promise, open };
}

const tick = () => new Promise((r) => setImmediate(r));

/**
 * Runs that record when they start and hold their slot until `finish()` (which waits for the
 * release to have woken whoever it wakes). A run refused at close counts as finished.
 */
function recorder(limiter: OriginLimiter) {
  const started: string[] = [];
  const hold = (origin: string, owner: string, name: string) => {
    const held = gate();
    const done = limiter
      .run(
        origin,
        async () => {
          started.push(name);
          await held.promise;
        },
        owner,
      )
      .catch((err: unknown) => {
        if (!(err instanceof LimiterClosedError)) throw err;
      });
    return {
      finish: async (): Promise<void> => {
        held.open();
        await done;
        await tick();
      },
    };
  };
  return { started, hold };
}

describe('OriginLimiter', () => {
  it('holds at most perOrigin requests to one origin and total in all', async () => {
    const limiter = new OriginLimiter({ total: 3, perOrigin: 2 });
    const started: string[] = [];
    const gates = Array.from({ length: 5 }, gate);
    const origins = ['a', 'a', 'a', 'b', 'c'];
    const runs = origins.map((o, i) =>
      limiter.run(o, async () => {
        started.push(`${o}${i}`);
        await gates[i]?.promise;
      }),
    );
    await tick();
    // a0, a1 fill origin a; a2 waits; b3 takes the third global slot; c4 waits for a global slot.
    expect(started).toEqual(['a0', 'a1', 'b3']);
    expect([limiter.inFlight, limiter.waiting]).toEqual([3, 2]);
    gates[0]?.open();
    await tick();
    await tick();
    // The total cap held both: the origins take turns, a first (it waited first; it is back under its cap).
    expect(started).toEqual(['a0', 'a1', 'b3', 'a2']);
    gates[3]?.open();
    await tick();
    await tick();
    expect(started).toEqual(['a0', 'a1', 'b3', 'a2', 'c4']);
    for (const g of gates) g.open();
    await Promise.all(runs);
    expect([limiter.inFlight, limiter.waiting]).toEqual([0, 0]);
  });

  it('holds at most perOwner requests for one owner across any number of origins', async () => {
    const limiter = new OriginLimiter({ total: 4, perOrigin: 4, perOwner: 2 });
    const started: string[] = [];
    const gates = Array.from({ length: 5 }, gate);
    // Mallory's three requests go to three origins (each under its cap); bob's comes after them.
    const calls: [origin: string, owner: string][] = [
      ['m1', 'mallory'],
      ['m2', 'mallory'],
      ['m3', 'mallory'],
      ['b1', 'bob'],
      ['m4', 'mallory'],
    ];
    const runs = calls.map(([origin, owner], i) =>
      limiter.run(
        origin,
        async () => {
          started.push(origin);
          await gates[i]?.promise;
        },
        owner,
      ),
    );
    await tick();
    // Mallory holds two slots of four and waits for more; bob starts at once.
    expect(started).toEqual(['m1', 'm2', 'b1']);
    expect([limiter.inFlight, limiter.waiting]).toEqual([3, 2]);
    gates[0]?.open();
    await tick();
    await tick();
    // A slot of mallory's freed: her oldest waiter takes it.
    expect(started).toEqual(['m1', 'm2', 'b1', 'm3']);
    for (const g of gates) g.open();
    await Promise.all(runs);
    expect(started).toEqual(['m1', 'm2', 'b1', 'm3', 'm4']);
    expect([limiter.inFlight, limiter.waiting]).toEqual([0, 0]);
  });

  it('does not let a busy origin starve another one waiting behind it', async () => {
    const limiter = new OriginLimiter({ total: 2, perOrigin: 1 });
    const order: string[] = [];
    const first = gate();
    const running = limiter.run('busy', async () => {
      order.push('busy-1');
      await first.promise;
    });
    const more = limiter.run('busy', async () => {
      order.push('busy-2');
    });
    const other = limiter.run('quiet', async () => {
      order.push('quiet');
    });
    await other;
    // busy-2 queued first but its origin is at its cap: quiet went ahead.
    expect(order).toEqual(['busy-1', 'quiet']);
    first.open();
    await Promise.all([running, more]);
    expect(order).toEqual(['busy-1', 'quiet', 'busy-2']);
  });

  it("gives a freed slot at a full origin to the owner with the fewest in flight there, ahead of another owner's older waiters", async () => {
    const limiter = new OriginLimiter({ total: 10, perOrigin: 2 });
    const { started, hold } = recorder(limiter);
    // Alice fills the shared origin and queues two more; bob, then carol, queue behind her.
    const a1 = hold('shared', 'alice', 'a1');
    const a2 = hold('shared', 'alice', 'a2');
    const a3 = hold('shared', 'alice', 'a3');
    const a4 = hold('shared', 'alice', 'a4');
    const b1 = hold('shared', 'bob', 'b1');
    const c1 = hold('shared', 'carol', 'c1');
    await tick();
    expect(started).toEqual(['a1', 'a2']);
    // Bob has none in flight there (alice has one): his waiter goes ahead of her older ones.
    await a1.finish();
    expect(started).toEqual(['a1', 'a2', 'b1']);
    // Alice and carol have none in flight there now: alice's head waited longest.
    await a2.finish();
    expect(started).toEqual(['a1', 'a2', 'b1', 'a3']);
    // Carol has none, alice one: carol. Then alice, first-in first-out.
    await b1.finish();
    await a3.finish();
    expect(started).toEqual(['a1', 'a2', 'b1', 'a3', 'c1', 'a4']);
    await Promise.all([a4.finish(), c1.finish()]);
    expect([limiter.inFlight, limiter.waiting]).toEqual([0, 0]);
  });

  it('lets an owner alone at an origin use all of its slots', async () => {
    const limiter = new OriginLimiter({ total: 10, perOrigin: 4, perOwner: 8 });
    const { started, hold } = recorder(limiter);
    const runs = ['1', '2', '3', '4', '5'].map((n) => hold('o', 'alice', n));
    await tick();
    expect(started).toEqual(['1', '2', '3', '4']);
    await runs[0]?.finish();
    expect(started).toEqual(['1', '2', '3', '4', '5']);
    await Promise.all(runs.map((r) => r.finish()));
  });

  it('looks only where a release made room, not at every waiter parked elsewhere', async () => {
    const limiter = new OriginLimiter({ total: 100, perOrigin: 4, perOwner: 50 });
    const { started, hold } = recorder(limiter);
    // 1000 waiters of ten owners parked behind a full origin that hangs.
    const hanging = Array.from({ length: 1004 }, (_, i) => hold('hanging', `owner-${i % 10}`, `h${i}`));
    await tick();
    expect([limiter.inFlight, limiter.waiting]).toEqual([4, 1000]);
    // 200 requests to a healthy origin, 4 at a time: their releases free nothing anyone waits for.
    let next = 0;
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        while (next < 200) {
          next++;
          await limiter.run('healthy', async () => undefined, 'healthy-client');
        }
      }),
    );
    expect(limiter.examined).toBe(0);
    // A slot freed at the hanging origin: one look per owner waiting there, not per waiter.
    await hanging[0]?.finish();
    expect(started.at(-1)).toBe('h4');
    expect(limiter.examined).toBe(10);
    limiter.close();
    await Promise.all(hanging.map((r) => r.finish()));
  });

  it('lets origins take turns for the slots the total cap held', async () => {
    const limiter = new OriginLimiter({ total: 4, perOrigin: 2 });
    const { started, hold } = recorder(limiter);
    // Two full origins fill the total; each has waiters, then a quiet origin's one comes.
    const x = ['x1', 'x2', 'x3', 'x4'].map((n) => hold('x', 'alice', n));
    const y = ['y1', 'y2', 'y3'].map((n) => hold('y', 'bob', n));
    const q = hold('quiet', 'carol', 'q1');
    await tick();
    expect(started).toEqual(['x1', 'x2', 'y1', 'y2']);
    // x's turn (it waited first), then y is still full and the quiet origin's turn comes before x's again.
    await x[0]?.finish();
    expect(started.at(-1)).toBe('x3');
    await x[1]?.finish();
    expect(started.at(-1)).toBe('q1');
    await x[2]?.finish();
    expect(started.at(-1)).toBe('x4');
    // Per release, the origin whose turn it is and its one owner waiting, plus y (full) skipped twice.
    expect(limiter.examined).toBe(8);
    limiter.close();
    await Promise.all([...x, ...y, q].map((r) => r.finish()));
  });

  it.each([
    { total: 7, perOrigin: 3, perOwner: 4 },
    { total: 6, perOrigin: 4, perOwner: 2 },
    { total: 4, perOrigin: 2, perOwner: 3 },
  ])(
    'keeps every cap and leaves no waiter that could start, whatever comes and goes ($total, $perOrigin, $perOwner)',
    async (caps) => {
      const limiter = new OriginLimiter(caps);
      // A fixed pseudo-random sequence (LCG): the same steps every run.
      let seed = 42;
      const random = (n: number): number => {
        seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31;
        return Math.floor((seed / 2 ** 31) * n);
      };
      interface Request {
        readonly origin: string;
        readonly owner: string;
        running: boolean;
        release: () => void;
        done: Promise<unknown>;
      }
      const requests = new Set<Request>();
      for (let step = 0; step < 2000; step++) {
        const running = [...requests].filter((r) => r.running);
        // Up to about twice what the caps let run: waiters at every cap, none piling up for ever.
        if (running.length === 0 || (requests.size < 16 && random(2) === 0)) {
          const held = gate();
          const r: Request = {
            origin: `o${random(4)}`,
            owner: `c${random(4)}`,
            running: false,
            release: held.open,
            done: Promise.resolve(),
          };
          r.done = limiter.run(
            r.origin,
            async () => {
              r.running = true;
              await held.promise;
            },
            r.owner,
          );
          requests.add(r);
        } else {
          const r = running[random(running.length)] as Request;
          r.release();
          await r.done;
          requests.delete(r);
        }
        await tick();
        const all = [...requests];
        const atOrigin = new Map<string, number>();
        const ofOwner = new Map<string, number>();
        for (const r of all.filter((r) => r.running)) {
          atOrigin.set(r.origin, (atOrigin.get(r.origin) ?? 0) + 1);
          ofOwner.set(r.owner, (ofOwner.get(r.owner) ?? 0) + 1);
        }
        const total = all.filter((r) => r.running).length;
        expect([limiter.inFlight, limiter.waiting]).toEqual([total, all.length - total]);
        expect(total).toBeLessThanOrEqual(caps.total);
        expect(Math.max(0, ...atOrigin.values())).toBeLessThanOrEqual(caps.perOrigin);
        expect(Math.max(0, ...ofOwner.values())).toBeLessThanOrEqual(caps.perOwner);
        // Each waiter is held by a cap: one that could start would have been woken.
        const held = all.filter(
          (r) =>
            !r.running &&
            total < caps.total &&
            (atOrigin.get(r.origin) ?? 0) < caps.perOrigin &&
            (ofOwner.get(r.owner) ?? 0) < caps.perOwner,
        );
        expect(held).toEqual([]);
      }
      limiter.close();
      for (const r of requests) r.release();
      await Promise.allSettled([...requests].map((r) => r.done));
      expect([limiter.inFlight, limiter.waiting]).toEqual([0, 0]);
    },
  );

  it('refuses new work after close and releases waiters without running them', async () => {
    const limiter = new OriginLimiter({ total: 1, perOrigin: 1 });
    const held = gate();
    const running = limiter.run('a', () => held.promise);
    let ran = false;
    const waiting = limiter.run('a', async () => {
      ran = true;
    });
    limiter.close();
    await expect(waiting).rejects.toBeInstanceOf(LimiterClosedError);
    await expect(limiter.run('b', async () => undefined)).rejects.toBeInstanceOf(LimiterClosedError);
    held.open();
    await running;
    expect(ran).toBe(false);
  });

  it('refuses limits below one', () => {
    expect(() => new OriginLimiter({ total: 0, perOrigin: 1 })).toThrow(TypeError);
  });
});
