import { createHash } from 'node:crypto';
import { MatchIndex, matchesSpec } from '../src/core/match-index.js';
import type { Interaction, MatchSpec, ResourceChange } from '../src/core/types.js';
import { fmt, median, pick, printTable, prng, type TargetCheck } from './util.js';

/**
 * Suite `match`: per-event cost of MatchIndex.match against a linear scan with matchesSpec over
 * the same subscriptions, at 1k, 10k and 100k subscriptions over 50 resource types.
 *
 * Two mixes (see bench/README.md):
 * - `bounded`: the broad subscriptions (700 type-only, 99 `_type` lists, 1 `*`) stay at their 1k
 *   count and the rest are `_id`-filtered, so a change matches ~tens of subscriptions at every size.
 *   This is the mix the targets are judged on: it isolates the index from the size of its answer.
 * - `proportional`: 70% type-only, 20% `_id`, 10% multi-type at every size, exactly as the issue
 *   describes; each event then matches ~1.4% of all subscriptions, so the answer grows with N.
 *
 * Then, informational only: the bounded mix at 1k and 100k with UUID resource ids (as HealthLake's).
 */

const TYPES = [
  'Patient',
  'Observation',
  'Encounter',
  'Condition',
  'Procedure',
  'MedicationRequest',
  'MedicationStatement',
  'MedicationAdministration',
  'Medication',
  'AllergyIntolerance',
  'Immunization',
  'DiagnosticReport',
  'DocumentReference',
  'CarePlan',
  'CareTeam',
  'Goal',
  'ServiceRequest',
  'Appointment',
  'Schedule',
  'Slot',
  'Practitioner',
  'PractitionerRole',
  'Organization',
  'Location',
  'HealthcareService',
  'Device',
  'Specimen',
  'ImagingStudy',
  'Coverage',
  'Claim',
  'ClaimResponse',
  'ExplanationOfBenefit',
  'QuestionnaireResponse',
  'Questionnaire',
  'Composition',
  'Consent',
  'Provenance',
  'RelatedPerson',
  'FamilyMemberHistory',
  'Communication',
  'CommunicationRequest',
  'Task',
  'EpisodeOfCare',
  'Flag',
  'RiskAssessment',
  'NutritionOrder',
  'DeviceRequest',
  'SupplyRequest',
  'Invoice',
  'Account',
] as const;
const IDS_PER_TYPE = 2000;
const EVENTS = 4096;
const NOW = Date.parse('2026-01-01T00:00:00Z');
const SIZES = [1_000, 10_000, 100_000] as const;

/** Interaction sets a subscription asks for, with weights. */
const INTERACTION_SETS: readonly (readonly [number, readonly Interaction[]])[] = [
  [0.5, ['create', 'update', 'delete']],
  [0.2, ['create', 'update']],
  [0.1, ['update']],
  [0.1, ['create']],
  [0.05, ['delete']],
  [0.05, ['update', 'delete']],
];

type Mix = 'bounded' | 'proportional';

interface Sub {
  readonly id: string;
  readonly match: MatchSpec;
}

function interactions(rand: () => number): readonly Interaction[] {
  let r = rand();
  for (const [w, set] of INTERACTION_SETS) {
    r -= w;
    if (r < 0) return set;
  }
  return ['create', 'update', 'delete'];
}

function resourceId(rand: () => number): string {
  return `r${Math.floor(rand() * IDS_PER_TYPE).toString(36)}`;
}

/** Counts of [type-only, _id, multi-type lists, '*'] for a mix and size. */
function counts(mix: Mix, n: number): [number, number, number, number] {
  if (mix === 'bounded') return [700, n - 800, 99, 1];
  const star = Math.max(1, Math.round(n * 0.001));
  return [Math.round(n * 0.7), Math.round(n * 0.2), Math.round(n * 0.1) - star, star];
}

export function buildSubscriptions(mix: Mix, n: number, seed: number): Sub[] {
  const rand = prng(seed);
  const [typeOnly, byId, multi, star] = counts(mix, n);
  const subs: Sub[] = [];
  const add = (match: MatchSpec): void => void subs.push({ id: `s${subs.length}`, match });
  for (let i = 0; i < typeOnly; i++) add({ resourceTypes: [pick(rand, TYPES)], interactions: interactions(rand) });
  for (let i = 0; i < byId; i++) {
    const ids = Array.from({ length: 1 + Math.floor(rand() * 3) }, () => resourceId(rand));
    add({ resourceTypes: [pick(rand, TYPES)], interactions: interactions(rand), ids: [...new Set(ids)] });
  }
  for (let i = 0; i < multi; i++) {
    const types = new Set(Array.from({ length: 2 + Math.floor(rand() * 4) }, () => pick(rand, TYPES)));
    add({ resourceTypes: [...types], interactions: interactions(rand) });
  }
  for (let i = 0; i < star; i++) add({ resourceTypes: '*', interactions: interactions(rand) });
  return subs;
}

export function buildEvents(seed: number): ResourceChange[] {
  const rand = prng(seed);
  return Array.from({ length: EVENTS }, (_, i): ResourceChange => {
    const r = rand();
    const interaction: Interaction = r < 0.6 ? 'update' : r < 0.9 ? 'create' : 'delete';
    // 5% are older CloudTrail events without additionalEventData.resourceId.
    const noId = rand() < 0.05;
    return {
      eventId: `e${i}`,
      resourceType: pick(rand, TYPES),
      ...(noId ? {} : { resourceId: resourceId(rand) }),
      interaction,
      datastoreId: 'abcdef01234567890abcdef012345678',
      fhirBase: 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4',
      time: '2026-01-01T00:00:00.000Z',
    };
  });
}

function linearScan(subs: readonly Sub[], change: ResourceChange): string[] {
  const out: string[] = [];
  for (const s of subs) if (matchesSpec(s.match, change)) out.push(s.id);
  return out;
}

let sink = 0;

/**
 * Runs `round` (which handles `perRound` events) until `budgetMs` is spent (at least `minRounds`),
 * after `warmupMs` of the same; returns the median ns per event over rounds.
 */
function measure(round: () => number, perRound: number, warmupMs: number, budgetMs: number, minRounds = 5): number {
  const warmEnd = performance.now() + warmupMs;
  while (performance.now() < warmEnd) sink += round();
  const samples: number[] = [];
  const end = performance.now() + budgetMs;
  while (samples.length < minRounds || performance.now() < end) {
    const t0 = process.hrtime.bigint();
    sink += round();
    samples.push(Number(process.hrtime.bigint() - t0) / perRound);
  }
  return median(samples);
}

interface Row {
  readonly mix: Mix;
  readonly n: number;
  readonly matchesPerEvent: number;
  readonly indexNs: number;
  readonly scanNs: number;
  readonly upsertNs: number;
}

function runOne(mix: Mix, n: number, events: readonly ResourceChange[]): Row {
  const subs = buildSubscriptions(mix, n, 0x5eed + n);
  const index = new MatchIndex();
  const t0 = process.hrtime.bigint();
  for (const s of subs) index.upsert({ id: s.id, status: 'active', match: s.match });
  const upsertNs = Number(process.hrtime.bigint() - t0) / subs.length;
  const matches = checkAgreement(index, subs, events, `${mix}/${n}`);
  const indexNs = measureIndex(index, events);
  // The scan handles a slice of the events per round so that a round stays short at 100k.
  const slice = events.slice(0, Math.max(16, Math.min(events.length, Math.floor(4_000_000 / n))));
  const scanNs = measure(
    () => {
      let total = 0;
      for (const e of slice) total += linearScan(subs, e).length;
      return total;
    },
    slice.length,
    150,
    500,
  );
  return { mix, n, matchesPerEvent: matches / events.length, indexNs, scanNs, upsertNs };
}

/** The index must agree with the reference semantics before its speed means anything; returns the matches. */
function checkAgreement(
  index: MatchIndex,
  subs: readonly Sub[],
  events: readonly ResourceChange[],
  label: string,
): number {
  let matches = 0;
  for (const [i, e] of events.entries()) {
    const got = index.match(e, NOW);
    matches += got.length;
    if (i < 64) {
      const want = linearScan(subs, e);
      if (got.length !== want.length || [...got].sort().join() !== [...want].sort().join()) {
        throw new Error(`index and linear scan disagree on ${label} event ${i}`);
      }
    }
  }
  return matches;
}

function measureIndex(index: MatchIndex, events: readonly ResourceChange[]): number {
  return measure(
    () => {
      let total = 0;
      for (const e of events) total += index.match(e, NOW).length;
      return total;
    },
    events.length,
    200,
    600,
  );
}

/** A UUID-shaped id (like HealthLake's), the same for the same (type, id). */
function uuidShaped(type: string, id: string): string {
  const h = createHash('sha1').update(`${type}/${id}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

/**
 * Informational, no target: index ns/event on the bounded mix with every resource id renamed to a
 * 36-character UUID, as HealthLake assigns them (the workload above uses 2–4 character ids).
 */
function runUuidIds(n: number, events: readonly ResourceChange[]): number {
  const renamed = events.map((e) =>
    e.resourceId === undefined ? e : { ...e, resourceId: uuidShaped(e.resourceType, e.resourceId) },
  );
  const subs = buildSubscriptions('bounded', n, 0x5eed + n).map((s): Sub => {
    const { resourceTypes, ids } = s.match;
    if (ids === undefined) return s;
    // In the bounded mix, only single-type subscriptions filter by id.
    const [type] = resourceTypes as readonly string[];
    return { ...s, match: { ...s.match, ids: ids.map((id) => uuidShaped(type as string, id)) } };
  });
  const index = new MatchIndex();
  for (const s of subs) index.upsert({ id: s.id, status: 'active', match: s.match });
  checkAgreement(index, subs, renamed, `bounded/${n}/uuid`);
  return measureIndex(index, renamed);
}

export async function runMatch(): Promise<TargetCheck[]> {
  console.log('\n## match: MatchIndex.match vs linear scan with matchesSpec (ns per event, median of rounds)\n');
  const events = buildEvents(0xe7e47);
  const rows: Row[] = [];
  for (const mix of ['bounded', 'proportional'] as const) for (const n of SIZES) rows.push(runOne(mix, n, events));
  printTable([
    [
      'mix',
      'subs',
      'matches/event',
      'index ns/event',
      'scan ns/event',
      'scan/index',
      'index ns/match',
      'upsert ns/sub',
    ],
    ...rows.map((r) => [
      r.mix,
      fmt(r.n),
      fmt(r.matchesPerEvent, 1),
      fmt(r.indexNs),
      fmt(r.scanNs),
      `${fmt(r.scanNs / r.indexNs, 0)}x`,
      fmt(r.indexNs / Math.max(r.matchesPerEvent, 1e-9), 1),
      fmt(r.upsertNs),
    ]),
  ]);
  const uuid1k = runUuidIds(1_000, events);
  const uuid100k = runUuidIds(100_000, events);
  console.log(
    `\nbounded with UUID resource ids (informational): index ${fmt(uuid1k)} ns/event at 1k, ${fmt(uuid100k)} at 100k = ${fmt(uuid100k / uuid1k, 2)}x\n`,
  );
  if (sink === -1) console.log(sink);

  const get = (mix: Mix, n: number): Row => rows.find((r) => r.mix === mix && r.n === n) as Row;
  const checks: TargetCheck[] = [];
  for (const mix of ['bounded', 'proportional'] as const) {
    const small = get(mix, 1_000);
    const large = get(mix, 100_000);
    const growth = large.indexNs / small.indexNs;
    const speedup = large.scanNs / large.indexNs;
    console.log(
      `${mix}: index 100k/1k = ${fmt(growth, 2)}x (target ≤ 2x); scan/index at 100k = ${fmt(speedup, 0)}x (target ≥ 100x)`,
    );
    checks.push(
      {
        suite: `match (${mix})`,
        target: 'index ns/event at 100k ≤ 2x of 1k',
        measured: `${fmt(growth, 2)}x`,
        met: growth <= 2,
      },
      {
        suite: `match (${mix})`,
        target: 'index ≥ 100x faster than scan at 100k',
        measured: `${fmt(speedup, 0)}x`,
        met: speedup >= 100,
      },
    );
  }
  return checks;
}
