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
    // The freed slot goes to the oldest waiter that may start: a2 (origin a is back under its cap).
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
