import { describe, expect, it } from 'vitest';
import { memo } from './memo.js';

describe('memo', () => {
  it('computes once per key, and starts over rather than grow past the limit', () => {
    const map = new Map<string, number>();
    let calls = 0;
    const len = (k: string): number => {
      calls++;
      return k.length;
    };
    expect(memo(map, 'ab', len, 2)).toBe(2);
    expect(memo(map, 'ab', len, 2)).toBe(2);
    expect(calls).toBe(1);
    memo(map, 'abc', len, 2);
    expect(map.size).toBe(2);
    expect(memo(map, 'abcd', len, 2)).toBe(4);
    expect([...map.keys()]).toEqual(['abcd']);
    expect(calls).toBe(3);
  });
});
