import { describe, expect, it } from 'vitest';
import { matchesSpec } from './match-index.js';
import { matchFromStore, storedMatch } from './stored-match.js';
import type { MatchSpec, ResourceChange } from './types.js';

const change: ResourceChange = {
  eventId: 'e1',
  resourceType: 'Observation',
  resourceId: 'o1',
  interaction: 'update',
  datastoreId: 'd',
  fhirBase: 'https://h/r4',
  time: '2024-01-01T00:00:00Z',
};

describe('the stored form of a MatchSpec', () => {
  it('keeps a spec without content filters exactly as JSON has it', () => {
    const spec: MatchSpec = { resourceTypes: ['Patient'], interactions: ['create', 'update'], ids: ['a', 'b'] };
    expect(storedMatch(spec)).toBe(JSON.stringify(spec));
    expect(matchFromStore(storedMatch(spec))).toEqual(spec);
    const any: MatchSpec = { resourceTypes: '*', interactions: ['delete'] };
    expect(matchFromStore(storedMatch(any))).toEqual(any);
  });

  it('round-trips a spec with content filters', () => {
    const spec: MatchSpec = {
      resourceTypes: ['Observation'],
      interactions: ['create', 'update', 'delete'],
      content: [{ param: 'patient', type: 'reference', values: ['Patient/1'], targets: ['Patient'] }],
    };
    expect(matchFromStore(storedMatch(spec))).toEqual(spec);
    expect(matchesSpec(matchFromStore(storedMatch(spec)), change)).toBe(true);
  });

  it('reads, to code that knows nothing of content filters, as matching nothing (a rollback fails closed)', () => {
    const spec: MatchSpec = {
      resourceTypes: ['Observation'],
      interactions: ['create', 'update', 'delete'],
      content: [{ param: 'patient', type: 'reference', values: ['Patient/1'], targets: ['Patient'] }],
    };
    // What an older broker does: JSON.parse, and match on resourceTypes / interactions / ids.
    const asOlderCodeReadsIt = JSON.parse(storedMatch(spec)) as MatchSpec;
    expect(asOlderCodeReadsIt.resourceTypes).toEqual([]);
    expect(matchesSpec({ ...asOlderCodeReadsIt, content: undefined }, change)).toBe(false);
  });
});
