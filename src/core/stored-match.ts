import type { MatchSpec } from './types.js';

/**
 * A MatchSpec as the stores keep it (SQLite `match_json`, DynamoDB `match`, also on the type-index
 * rows). A spec with content filters is kept with `resourceTypes: []` and its types under
 * `contentTypes`: a broker from before content filters (a CloudFormation rollback, an older
 * checkout on the same data directory) then reads it as matching nothing, where it would ignore
 * `content` and deliver every change of its types unfiltered. Failing closed is the only safe
 * reading for code that cannot decide the filters.
 */

interface Stored extends Omit<MatchSpec, 'resourceTypes'> {
  readonly resourceTypes: MatchSpec['resourceTypes'];
  readonly contentTypes?: readonly string[];
}

export function storedMatch(spec: MatchSpec): string {
  if (spec.content === undefined) return JSON.stringify(spec);
  const stored: Stored = { ...spec, resourceTypes: [], contentTypes: spec.resourceTypes as readonly string[] };
  return JSON.stringify(stored);
}

export function matchFromStore(json: string): MatchSpec {
  const { contentTypes, ...rest } = JSON.parse(json) as Stored;
  return contentTypes === undefined ? rest : { ...rest, resourceTypes: contentTypes };
}
