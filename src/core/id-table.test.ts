import { describe, expect, it } from 'vitest';
import { prng } from '../../test/support/prng.js';
import { HAS_END, IdTable, idFingerprint } from './id-table.js';

const NOW = 1_000_000;
const BITS = [1, 2, 4] as const;

/** The table's contract as plain maps: id → subscription id → flags. */
class Model {
  readonly byId = new Map<string, Map<string, number>>();

  add(id: string, subId: string, flags: number): void {
    let postings = this.byId.get(id);
    if (postings === undefined) {
      postings = new Map();
      this.byId.set(id, postings);
    }
    postings.set(subId, flags);
  }

  remove(id: string, subId: string): void {
    const postings = this.byId.get(id);
    postings?.delete(subId);
    if (postings?.size === 0) this.byId.delete(id);
  }

  has(id: string, subId: string): boolean {
    return this.byId.get(id)?.has(subId) ?? false;
  }

  collect(id: string, bit: number, ends: ReadonlyMap<string, number>): string[] {
    return [...(this.byId.get(id) ?? [])]
      .filter(([subId, flags]) => (flags & bit) !== 0 && ((flags & HAS_END) === 0 || (ends.get(subId) ?? 0) > NOW))
      .map(([subId]) => subId)
      .sort();
  }
}

function collected(table: IdTable, id: string, bit: number, ends: ReadonlyMap<string, number>): string[] {
  const out: string[] = [];
  table.collect(id, bit, NOW, ends, out);
  return out.sort();
}

/**
 * Ids of one length that differ only before their last 8 characters: the fingerprint samples the
 * tail, so every id of a family has the same fingerprint and they all share one probe chain.
 */
function family(tail: string, n: number): string[] {
  return Array.from({ length: n }, (_, k) => `${k.toString(36).padStart(3, '0')}-${tail}`);
}

describe('idFingerprint', () => {
  it('is a non-zero int32 that depends on the length and the last 8 characters only', () => {
    for (const id of ['', 'a', 'r1z', 'Patient-000123', '3f2b8c1e-9d4a-4b7e-a1c2-5e6f7a8b9c0d']) {
      const fp = idFingerprint(id);
      expect(fp).not.toBe(0);
      expect(fp | 0).toBe(fp);
    }
    expect(idFingerprint('aaa-12345678')).toBe(idFingerprint('bbb-12345678'));
    expect(idFingerprint('aaa-12345678', true)).not.toBe(idFingerprint('bbb-12345678', true));
    expect(idFingerprint('a-12345678')).not.toBe(idFingerprint('aa-12345678'));
    expect(idFingerprint('r1')).not.toBe(idFingerprint('r2'));
  });

  it('spreads random UUIDs and short sequential ids over the slots of a table', () => {
    const random = prng(7);
    const hex = (n: number): string => Array.from({ length: n }, () => Math.floor(random() * 16).toString(16)).join('');
    const uuids = Array.from({ length: 4096 }, () => `${hex(8)}-${hex(4)}-4${hex(3)}-a${hex(3)}-${hex(12)}`);
    const short = Array.from({ length: 4096 }, (_, k) => `r${k.toString(36)}`);
    for (const ids of [uuids, short]) {
      const perSlot = new Map<number, number>();
      for (const id of ids) perSlot.set(idFingerprint(id) & 4095, (perSlot.get(idFingerprint(id) & 4095) ?? 0) + 1);
      // 4096 keys in 4096 slots: a uniform hash leaves ~37% of the slots empty and none very full.
      expect(perSlot.size).toBeGreaterThan(2400);
      expect(Math.max(...perSlot.values())).toBeLessThan(10);
    }
  });
});

describe('IdTable', () => {
  it('files, finds and drops postings, with more than the inline four under one id', () => {
    const table = new IdTable();
    for (let k = 0; k < 7; k++) table.add('p1', `s${k}`, k % 2 === 0 ? 1 : 3);
    table.add('p2', 'x', 4);
    expect(table.size).toBe(2);
    expect(collected(table, 'p1', 1, new Map())).toEqual(['s0', 's1', 's2', 's3', 's4', 's5', 's6']);
    expect(collected(table, 'p1', 2, new Map())).toEqual(['s1', 's3', 's5']);
    expect(collected(table, 'p1', 4, new Map())).toEqual([]);
    table.remove('p1', 's0');
    table.remove('p1', 's5');
    table.remove('p1', 'absent');
    table.remove('absent', 's1');
    expect(collected(table, 'p1', 1, new Map())).toEqual(['s1', 's2', 's3', 's4', 's6']);
    for (const subId of ['s1', 's2', 's3', 's4', 's6']) table.remove('p1', subId);
    expect(table.size).toBe(1);
    expect(collected(table, 'p1', 1, new Map())).toEqual([]);
    expect(collected(table, 'p2', 4, new Map())).toEqual(['x']);
  });

  it('skips postings flagged HAS_END whose end is now or past', () => {
    const table = new IdTable();
    const ends = new Map([
      ['past', NOW - 1],
      ['now', NOW],
      ['later', NOW + 1],
    ]);
    for (const subId of ['past', 'now', 'later']) table.add('p', subId, 1 | HAS_END);
    table.add('p', 'forever', 1);
    expect(collected(table, 'p', 1, ends)).toEqual(['forever', 'later']);
  });

  it('tells apart ids with the same fingerprint', () => {
    const table = new IdTable();
    const ids = family('00000001', 8);
    expect(new Set(ids.map((id) => idFingerprint(id))).size).toBe(1);
    for (const [k, id] of ids.entries()) table.add(id, `s${k}`, 1);
    expect(table.fingerprintsWholeIds).toBe(false);
    for (const [k, id] of ids.entries()) expect(collected(table, id, 1, new Map())).toEqual([`s${k}`]);
    expect(collected(table, family('00000001', 9)[8] as string, 1, new Map())).toEqual([]);
  });

  it('fingerprints whole ids once more than eight ids share one fingerprint, and keeps every posting', () => {
    const table = new IdTable();
    const ids = family('00000001', 40);
    for (const [k, id] of ids.entries()) {
      table.add(id, `s${k}`, 1);
      table.add(id, `t${k}`, 2);
      expect(table.fingerprintsWholeIds).toBe(k >= 8);
    }
    for (const [k, id] of ids.entries()) {
      expect(collected(table, id, 1, new Map())).toEqual([`s${k}`]);
      expect(collected(table, id, 2, new Map())).toEqual([`t${k}`]);
    }
  });

  // Random adds and removes against the model, over ids that collide on purpose (families sharing a
  // fingerprint) and by chance (many ids in few slots), through growth and backward-shift deletions.
  // Families of up to 8 ids stay on tail fingerprints (collision chains); larger ones switch the table
  // to whole ids in the middle of the run.
  const tails = Array.from({ length: 60 }, (_, k) => k.toString(36).padStart(8, '-'));
  for (const [name, ids, wholeIds] of [
    ['random short ids', Array.from({ length: 600 }, (_, k) => `r${(k * 7919).toString(36)}`), false],
    ['families of 8 sharing a fingerprint', tails.flatMap((tail) => family(tail, 8)), false],
    [
      'families of 60 sharing a fingerprint',
      ['a', 'b', 'c', 'd', 'e', 'f'].flatMap((c) => family(c.repeat(8), 60)),
      true,
    ],
  ] as const) {
    it(`agrees with a model under random adds and removes: ${name}`, () => {
      const random = prng(ids.length);
      const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)] as T;
      const subs = Array.from({ length: 40 }, (_, k) => `sub${k}`);
      const ends = new Map(subs.map((s, k) => [s, k % 3 === 0 ? NOW : NOW + 1]));
      const table = new IdTable();
      const model = new Model();
      const check = (): void => {
        expect(table.size).toBe(model.byId.size);
        for (const id of ids)
          for (const bit of BITS) expect(collected(table, id, bit, ends)).toEqual(model.collect(id, bit, ends));
      };
      const live: [string, string][] = [];
      for (let step = 0; step < 12_000; step++) {
        // Fill up for a while, then drain, then fill again: the table grows, empties and grows back.
        const adding = step % 4000 < 2500 ? random() < 0.75 : random() < 0.2;
        if (adding) {
          const id = pick(ids);
          const subId = pick(subs);
          if (model.has(id, subId)) continue;
          const flags = (1 + Math.floor(random() * 7)) | (random() < 0.3 ? HAS_END : 0);
          table.add(id, subId, flags);
          model.add(id, subId, flags);
          live.push([id, subId]);
        } else if (live.length > 0) {
          const k = Math.floor(random() * live.length);
          const [id, subId] = live[k] as [string, string];
          live[k] = live[live.length - 1] as [string, string];
          live.pop();
          table.remove(id, subId);
          model.remove(id, subId);
        }
        if (step % 1000 === 999) check();
      }
      check();
      expect(table.fingerprintsWholeIds).toBe(wholeIds);
      for (const [id, subId] of live) table.remove(id, subId);
      expect(table.size).toBe(0);
      for (const id of ids) expect(collected(table, id, 7, ends)).toEqual([]);
    });
  }
});
