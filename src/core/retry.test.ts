import { describe, expect, it } from 'vitest';
import {
  DEFAULT_HANDSHAKE_RETRY_DELAYS_MS,
  DEFAULT_RETRY_DELAYS_MS,
  nextHandshakeIn,
  nextRetryDelay,
  parseDurations,
} from './retry.js';

describe('nextHandshakeIn', () => {
  it('is due at the running sums of the delays, counted from when the subscription was requested', () => {
    const delays = [1000, 5000, 30_000];
    expect(nextHandshakeIn(delays, 40)).toBe(960);
    expect(nextHandshakeIn(delays, 1000)).toBe(5000);
    expect(nextHandshakeIn(delays, 1020)).toBe(4980);
    expect(nextHandshakeIn(delays, 6000)).toBe(30_000);
  });

  it('skips a due time that passed while an attempt was on the wire', () => {
    // A first attempt that timed out after 10 s: the next is the one due at 36 s.
    expect(nextHandshakeIn([1000, 5000, 30_000], 10_000)).toBe(26_000);
  });

  it('is over once the last due time has passed, in any process that reads the subscription', () => {
    expect(nextHandshakeIn([1000, 5000, 30_000], 36_000)).toBeUndefined();
    expect(nextHandshakeIn([1000, 5000, 30_000], 3_600_000)).toBeUndefined();
    expect(nextHandshakeIn([], 0)).toBeUndefined();
  });

  it('gives about a minute and a half by default', () => {
    expect(DEFAULT_HANDSHAKE_RETRY_DELAYS_MS.reduce((a, b) => a + b, 0)).toBe(96_000);
  });
});

describe('parseDurations', () => {
  it('parses every unit to milliseconds', () => {
    expect(parseDurations('500ms,5s,2m,1h,1d')).toEqual([500, 5000, 120_000, 3_600_000, 86_400_000]);
  });

  it('parses the documented example schedule', () => {
    expect(parseDurations('5s,30s,2m,10m,1h,6h,24h')).toEqual([
      5000, 30_000, 120_000, 600_000, 3_600_000, 21_600_000, 86_400_000,
    ]);
  });

  it('trims spaces around parts', () => {
    expect(parseDurations(' 5s , 30s ')).toEqual([5000, 30_000]);
  });

  it('accepts fractions and rounds to whole milliseconds', () => {
    expect(parseDurations('1.5s,0.5m,0.0004s')).toEqual([1500, 30_000, 0]);
  });

  it('accepts a single delay', () => {
    expect(parseDurations('10m')).toEqual([600_000]);
  });

  it.each([
    ['a bare number', '5', '"5" is not a duration like 500ms, 5s, 2m, 1h or 1d'],
    ['an unknown unit', '5w', '"5w" is not a duration like 500ms, 5s, 2m, 1h or 1d'],
    ['a negative delay', '-5s', '"-5s" is not a duration like 500ms, 5s, 2m, 1h or 1d'],
    ['an empty part', '5s,,10s', '"" is not a duration like 500ms, 5s, 2m, 1h or 1d'],
    ['an empty string', '', '"" is not a duration like 500ms, 5s, 2m, 1h or 1d'],
    ['an upper-case unit', '5S', '"5S" is not a duration like 500ms, 5s, 2m, 1h or 1d'],
    ['a space inside', '5 s', '"5 s" is not a duration like 500ms, 5s, 2m, 1h or 1d'],
  ])('throws a RangeError naming %s', (_name, text, message) => {
    expect(() => parseDurations(text)).toThrow(new RangeError(message));
  });
});

describe('nextRetryDelay', () => {
  const delays = [1000, 10_000, 100_000];

  it('uses the delay of the attempt just failed (1-based)', () => {
    expect(nextRetryDelay(delays, 1, 0.5)).toBe(1000);
    expect(nextRetryDelay(delays, 2, 0.5)).toBe(10_000);
    expect(nextRetryDelay(delays, 3, 0.5)).toBe(100_000);
  });

  it('jitters by at most 20 % either way', () => {
    expect(nextRetryDelay(delays, 2, 0)).toBe(8000);
    expect(nextRetryDelay(delays, 2, 0.999_999_999)).toBe(12_000);
    expect(nextRetryDelay(delays, 2, 0.25)).toBe(9000);
  });

  it('stays within the jitter bounds for every random value in [0, 1)', () => {
    for (let i = 0; i < 1000; i += 1) {
      const d = nextRetryDelay(delays, 3, i / 1000) ?? Number.NaN;
      expect(d).toBeGreaterThanOrEqual(80_000);
      expect(d).toBeLessThanOrEqual(120_000);
      expect(Number.isInteger(d)).toBe(true);
    }
  });

  it('is exhausted after the last delay', () => {
    expect(nextRetryDelay(delays, 4, 0.5)).toBeUndefined();
    expect(nextRetryDelay([], 1, 0.5)).toBeUndefined();
  });

  it('returns undefined for an attempt number below 1', () => {
    expect(nextRetryDelay(delays, 0, 0.5)).toBeUndefined();
  });

  it('has a default schedule of seven delays spanning about a day', () => {
    expect(DEFAULT_RETRY_DELAYS_MS).toEqual([5000, 30_000, 120_000, 600_000, 3_600_000, 21_600_000, 57_600_000]);
    const total = DEFAULT_RETRY_DELAYS_MS.reduce((a, b) => a + b, 0);
    expect(total).toBeGreaterThan(20 * 3_600_000);
    expect(total).toBeLessThanOrEqual(24 * 3_600_000);
    expect(nextRetryDelay(DEFAULT_RETRY_DELAYS_MS, 8, 0.5)).toBeUndefined();
  });
});
