/**
 * Retry schedule for deliveries: the delays between attempts, with ±20 % jitter so that a
 * recovering endpoint is not hit by every queued notification in the same second.
 */

/** About a day in all, matching EventBridge's own 24 h retry horizon. */
export const DEFAULT_RETRY_DELAYS_MS: readonly number[] = [5, 30, 120, 600, 3600, 6 * 3600, 16 * 3600].map(
  (s) => s * 1000,
);

/**
 * A handshake that fails is tried again at these delays before the subscription goes to `error`:
 * about a minute and a half in all. A client often starts listening only once it has the `201`
 * (a test kit stores its wait for the handshake after the create returns), so the first attempt,
 * made as the subscription is created, can find nobody there yet.
 */
export const DEFAULT_HANDSHAKE_RETRY_DELAYS_MS: readonly number[] = [1, 5, 30, 60].map((s) => s * 1000);

/**
 * How long after `elapsedMs` (since the subscription became `requested`) its next handshake is
 * due, or undefined when the schedule is over: the attempts are due at the delays' running sums,
 * so the answer is the same in any process that reads the subscription (on AWS, a scheduled run).
 */
export function nextHandshakeIn(delays: readonly number[], elapsedMs: number): number | undefined {
  let due = 0;
  for (const delay of delays) {
    due += delay;
    if (due > elapsedMs) return due - elapsedMs;
  }
  return undefined;
}

const UNIT_MS: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `"5s,30s,2m,1h"` → milliseconds. Throws `RangeError` naming the bad part. */
export function parseDurations(text: string): number[] {
  return text.split(',').map((raw) => {
    const part = raw.trim();
    const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(part);
    if (m === null) throw new RangeError(`"${part}" is not a duration like 500ms, 5s, 2m, 1h or 1d`);
    return Math.round(Number(m[1]) * (UNIT_MS[m[2] as string] as number));
  });
}

/**
 * Delay before attempt `attempt + 1` after `attempt` failures (1-based), or undefined when the
 * schedule is exhausted. `random` in [0, 1) comes from the caller so tests are exact.
 */
export function nextRetryDelay(delays: readonly number[], attempt: number, random: number): number | undefined {
  const base = delays[attempt - 1];
  if (base === undefined) return undefined;
  return Math.round(base * (0.8 + 0.4 * random));
}
