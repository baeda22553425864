import { describe, expect, it } from 'vitest';
import { prng } from '../../test/support/prng.js';
import { MatchIndex, matchesSpec } from './match-index.js';
import type { Interaction, MatchSpec, ResourceChange, SubscriptionRecord, SubscriptionStatus } from './types.js';

type IndexedSub = Pick<SubscriptionRecord, 'id' | 'status' | 'match' | 'end'>;

const NOW = Date.parse('2030-01-01T00:00:00Z');
const ALL: readonly Interaction[] = ['create', 'update', 'delete'];

function change(resourceType: string, interaction: Interaction, resourceId?: string): ResourceChange {
  return {
    eventId: `e-${resourceType}-${interaction}-${resourceId ?? 'none'}`,
    resourceType,
    ...(resourceId === undefined ? {} : { resourceId }),
    interaction,
    datastoreId: 'ds1',
    fhirBase: 'https://healthlake.us-east-1.amazonaws.com/datastore/ds1/r4',
    time: '2029-12-31T23:59:59.000Z',
  };
}

function sub(id: string, match: MatchSpec, status: SubscriptionStatus = 'active', end?: string): IndexedSub {
  return { id, status, match, ...(end === undefined ? {} : { end }) };
}

describe('MatchIndex agrees with matchesSpec', () => {
  const TYPES = ['Patient', 'Observation', 'Encounter', 'Condition', 'MedicationRequest'];
  const IDS = Array.from({ length: 12 }, (_, i) => `id${i}`);
  const STATUSES: readonly SubscriptionStatus[] = ['requested', 'active', 'error', 'off'];

  const random = prng(20_240_105);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)] as T;
  const someOf = <T>(xs: readonly T[]): T[] => {
    const chosen = xs.filter(() => random() < 0.4);
    return chosen.length === 0 ? [pick(xs)] : chosen;
  };

  function randomSpec(): MatchSpec {
    const resourceTypes = random() < 0.15 ? '*' : someOf(TYPES);
    const interactions = random() < 0.5 ? [...ALL] : someOf(ALL);
    return random() < 0.4 ? { resourceTypes, interactions, ids: someOf(IDS) } : { resourceTypes, interactions };
  }

  function randomEnd(): string | undefined {
    const r = random();
    if (r < 0.7) return undefined;
    // Half in the past, half in the future, a few exactly now (expired: the index keeps end > now).
    if (r < 0.8) return new Date(NOW - 1 - Math.floor(random() * 1e9)).toISOString();
    if (r < 0.98) return new Date(NOW + 1 + Math.floor(random() * 1e9)).toISOString();
    return new Date(NOW).toISOString();
  }

  const subs: IndexedSub[] = Array.from({ length: 2000 }, (_, i) =>
    sub(`s${i}`, randomSpec(), pick(STATUSES), randomEnd()),
  );
  const changes: ResourceChange[] = Array.from({ length: 500 }, () =>
    change(pick([...TYPES, 'Practitioner']), pick(ALL), random() < 0.2 ? undefined : pick([...IDS, 'other'])),
  );

  /** What the index should answer: matching status, not expired, and the spec matches. */
  function expected(c: ResourceChange, population: readonly IndexedSub[]): string[] {
    return population
      .filter((s) => s.status !== 'off')
      .filter((s) => s.end === undefined || Date.parse(s.end) > NOW)
      .filter((s) => matchesSpec(s.match, c))
      .map((s) => s.id)
      .sort();
  }

  it('returns exactly the subscriptions the reference matcher selects, each once', () => {
    const index = new MatchIndex();
    for (const s of subs) index.upsert(s);
    expect(index.size).toBe(subs.filter((s) => s.status !== 'off').length);
    let nonEmpty = 0;
    for (const c of changes) {
      const got = index.match(c, NOW);
      expect(new Set(got).size).toBe(got.length);
      expect([...got].sort()).toEqual(expected(c, subs));
      if (got.length > 0) nonEmpty += 1;
    }
    // The data set is only a meaningful comparison if most changes match something.
    expect(nonEmpty).toBeGreaterThan(400);
  });

  it('still agrees after a third of the subscriptions are replaced and a tenth removed', () => {
    const index = new MatchIndex();
    for (const s of subs) index.upsert(s);
    const current = new Map(subs.map((s) => [s.id, s]));
    for (const s of subs) {
      const r = random();
      if (r < 0.33) {
        const next = sub(s.id, randomSpec(), pick(STATUSES), randomEnd());
        index.upsert(next);
        current.set(s.id, next);
      } else if (r < 0.43) {
        index.remove(s.id);
        current.delete(s.id);
      }
    }
    const population = [...current.values()];
    expect(index.size).toBe(population.filter((s) => s.status !== 'off').length);
    for (const c of changes) expect(index.match(c, NOW).sort()).toEqual(expected(c, population));
  });
});

describe('MatchIndex agrees with matchesSpec under churn', () => {
  // Ids of one length that differ only before their last 8 characters share a fingerprint (see
  // idFingerprint), so these families put many ids on one probe chain of the id tables.
  // The two families of 8 stay on one chain each; the family of 20 makes a table switch to whole ids.
  const families = (
    [
      ['00000000', 8],
      ['a1b2c3d4', 8],
      ['zzzzzzzz', 20],
    ] as const
  ).flatMap(([tail, n]) => Array.from({ length: n }, (_, k) => `${String.fromCharCode(97 + k)}-${tail}`));
  const IDS = [...families, ...Array.from({ length: 60 }, (_, k) => `r${(k * 7919).toString(36)}`)];
  const TYPES = ['Patient', 'Observation', 'Encounter'];

  it('returns exactly the reference answer through thousands of upserts, re-upserts and removals', () => {
    const random = prng(4_242);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)] as T;
    const someOf = <T>(xs: readonly T[], p: number): T[] => {
      const chosen = xs.filter(() => random() < p);
      return chosen.length === 0 ? [pick(xs)] : chosen;
    };
    const randomSub = (id: string): IndexedSub => {
      const resourceTypes = random() < 0.1 ? '*' : someOf(TYPES, 0.3);
      const interactions = random() < 0.4 ? [...ALL] : someOf(ALL, 0.4);
      // Mostly id-filtered, sometimes naming an id twice.
      const ids = random() < 0.85 ? Array.from({ length: 1 + Math.floor(random() * 4) }, () => pick(IDS)) : undefined;
      const end =
        random() < 0.3
          ? new Date(NOW + (random() < 0.5 ? -1 : 1) * Math.floor(random() * 1e6)).toISOString()
          : undefined;
      const status = random() < 0.1 ? 'off' : 'active';
      return sub(
        id,
        ids === undefined ? { resourceTypes, interactions } : { resourceTypes, interactions, ids },
        status,
        end,
      );
    };
    const changes = Array.from({ length: 300 }, () =>
      change(pick([...TYPES, 'Practitioner']), pick(ALL), random() < 0.1 ? undefined : pick([...IDS, 'other'])),
    );
    const expected = (c: ResourceChange, population: Iterable<IndexedSub>): string[] =>
      [...population]
        .filter(
          (s) => s.status !== 'off' && (s.end === undefined || Date.parse(s.end) > NOW) && matchesSpec(s.match, c),
        )
        .map((s) => s.id)
        .sort();

    const index = new MatchIndex();
    const current = new Map<string, IndexedSub>();
    const subIds = Array.from({ length: 400 }, (_, k) => `s${k}`);
    for (let step = 0; step < 6_000; step++) {
      const id = pick(subIds);
      // Grow towards ~300 subscriptions, then churn: replace, re-upsert unchanged, remove.
      const r = random();
      if (r < 0.6) {
        const next = randomSub(id);
        index.upsert(next);
        if (next.status === 'off') current.delete(id);
        else current.set(id, next);
      } else if (r < 0.7 && current.has(id)) {
        index.upsert(current.get(id) as IndexedSub);
      } else {
        index.remove(id);
        current.delete(id);
      }
      if (step % 500 === 499) {
        expect(index.size).toBe(current.size);
        for (const c of changes) expect(index.match(c, NOW).sort()).toEqual(expected(c, current.values()));
      }
    }
    for (const id of subIds) index.remove(id);
    expect(index.size).toBe(0);
    for (const c of changes) expect(index.match(c, NOW)).toEqual([]);
  });
});

describe('MatchIndex', () => {
  const patientAll: MatchSpec = { resourceTypes: ['Patient'], interactions: ALL };

  it('matches a type-level subscription on every interaction it lists', () => {
    const index = new MatchIndex();
    index.upsert(sub('a', { resourceTypes: ['Patient'], interactions: ['create', 'delete'] }));
    expect(index.match(change('Patient', 'create', 'p1'), NOW)).toEqual(['a']);
    expect(index.match(change('Patient', 'update', 'p1'), NOW)).toEqual([]);
    expect(index.match(change('Patient', 'delete', 'p1'), NOW)).toEqual(['a']);
    expect(index.match(change('Observation', 'create', 'p1'), NOW)).toEqual([]);
  });

  it('matches a wildcard subscription on every type', () => {
    const index = new MatchIndex();
    index.upsert(sub('any', { resourceTypes: '*', interactions: ALL }));
    expect(index.match(change('Observation', 'update', 'o1'), NOW)).toEqual(['any']);
    expect(index.match(change('Patient', 'delete'), NOW)).toEqual(['any']);
  });

  it('replaces a subscription on upsert instead of adding a second entry', () => {
    const index = new MatchIndex();
    index.upsert(sub('a', patientAll));
    index.upsert(sub('a', { resourceTypes: ['Observation'], interactions: ALL }));
    expect(index.size).toBe(1);
    expect(index.match(change('Patient', 'create', 'p1'), NOW)).toEqual([]);
    expect(index.match(change('Observation', 'create', 'o1'), NOW)).toEqual(['a']);
  });

  it('removes a subscription', () => {
    const index = new MatchIndex();
    index.upsert(sub('a', patientAll));
    index.upsert(sub('b', patientAll));
    index.remove('a');
    expect(index.size).toBe(1);
    expect(index.match(change('Patient', 'create', 'p1'), NOW)).toEqual(['b']);
  });

  it('ignores removing an id it does not hold', () => {
    const index = new MatchIndex();
    index.upsert(sub('a', patientAll));
    index.remove('zzz');
    expect(index.match(change('Patient', 'create', 'p1'), NOW)).toEqual(['a']);
  });

  it('does not index subscriptions that are off, and upserting off removes one', () => {
    const index = new MatchIndex();
    index.upsert(sub('off', patientAll, 'off'));
    expect(index.size).toBe(0);
    index.upsert(sub('a', patientAll, 'active'));
    index.upsert(sub('a', patientAll, 'off'));
    expect(index.size).toBe(0);
    expect(index.match(change('Patient', 'create', 'p1'), NOW)).toEqual([]);
  });

  it('keeps collecting for requested and error subscriptions', () => {
    const index = new MatchIndex();
    index.upsert(sub('r', patientAll, 'requested'));
    index.upsert(sub('e', patientAll, 'error'));
    expect(index.match(change('Patient', 'create', 'p1'), NOW).sort()).toEqual(['e', 'r']);
  });

  it('excludes a subscription whose end is in the past or exactly now', () => {
    const index = new MatchIndex();
    index.upsert(sub('past', patientAll, 'active', '2029-12-31T23:59:59.999Z'));
    index.upsert(sub('now', patientAll, 'active', '2030-01-01T00:00:00.000Z'));
    index.upsert(sub('future', patientAll, 'active', '2030-01-01T00:00:00.001Z'));
    expect(index.match(change('Patient', 'create', 'p1'), NOW)).toEqual(['future']);
    expect(index.match(change('Patient', 'create', 'p1'), NOW - 1).sort()).toEqual(['future', 'now']);
  });

  it('matches id-filtered subscriptions only for events with one of their ids', () => {
    const index = new MatchIndex();
    index.upsert(sub('ids', { resourceTypes: ['Patient'], interactions: ALL, ids: ['p1', 'p2'] }));
    expect(index.match(change('Patient', 'update', 'p1'), NOW)).toEqual(['ids']);
    expect(index.match(change('Patient', 'update', 'p2'), NOW)).toEqual(['ids']);
    expect(index.match(change('Patient', 'update', 'p3'), NOW)).toEqual([]);
    expect(index.match(change('Observation', 'update', 'p1'), NOW)).toEqual([]);
  });

  it('matches id-filtered wildcard subscriptions by id on any type', () => {
    const index = new MatchIndex();
    index.upsert(sub('w', { resourceTypes: '*', interactions: ['delete'], ids: ['x1'] }));
    expect(index.match(change('Encounter', 'delete', 'x1'), NOW)).toEqual(['w']);
    expect(index.match(change('Encounter', 'update', 'x1'), NOW)).toEqual([]);
  });

  it('matches events without a resourceId only to subscriptions without ids', () => {
    const index = new MatchIndex();
    index.upsert(sub('type', patientAll));
    index.upsert(sub('ids', { resourceTypes: ['Patient'], interactions: ALL, ids: ['p1'] }));
    expect(index.match(change('Patient', 'update'), NOW)).toEqual(['type']);
  });

  it('counts but never matches a subscription without interactions, and removes it', () => {
    const index = new MatchIndex();
    index.upsert(
      sub('none', { resourceTypes: ['Patient'], interactions: [], ids: ['p1'] }, 'active', '2031-01-01T00:00:00Z'),
    );
    index.upsert(sub('typeOnly', { resourceTypes: '*', interactions: [] }));
    expect(index.size).toBe(2);
    for (const i of ALL) expect(index.match(change('Patient', i, 'p1'), NOW)).toEqual([]);
    index.remove('none');
    index.remove('typeOnly');
    expect(index.size).toBe(0);
  });

  it('never indexes a subscription whose ids are empty', () => {
    const index = new MatchIndex();
    index.upsert(sub('none', { resourceTypes: ['Patient'], interactions: ALL, ids: [] }));
    expect(index.match(change('Patient', 'update', 'p1'), NOW)).toEqual([]);
    expect(index.match(change('Patient', 'update'), NOW)).toEqual([]);
  });
});

describe('matchesSpec', () => {
  it('requires type, interaction and (when listed) id to agree', () => {
    const spec: MatchSpec = { resourceTypes: ['Patient'], interactions: ['update'], ids: ['p1'] };
    expect(matchesSpec(spec, change('Patient', 'update', 'p1'))).toBe(true);
    expect(matchesSpec(spec, change('Patient', 'update', 'p2'))).toBe(false);
    expect(matchesSpec(spec, change('Patient', 'update'))).toBe(false);
    expect(matchesSpec(spec, change('Patient', 'create', 'p1'))).toBe(false);
    expect(matchesSpec(spec, change('Observation', 'update', 'p1'))).toBe(false);
  });
});
