import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { InvalidEnvelopeError, type ParsedEvent, parseEventBridgeEvent } from './cloudtrail.js';

const FIXTURES = join(import.meta.dirname, '..', '..', 'test', 'fixtures');
const RECEIVED_AT = '2030-02-03T04:05:06.000Z';
const DATASTORE = 'abcdef01234567890abcdef012345678';
const FHIR_BASE = `https://healthlake.us-east-1.amazonaws.com/datastore/${DATASTORE}/r4`;
const PATIENT_ID = 'a1b2c3d4-5678-90ab-cdef-EXAMPLE22222';
const EVENT_TIME = '2024-01-05T19:30:17.000Z';

function fixture(name: string): Record<string, unknown> {
  return JSON.parse(readFileSync(join(FIXTURES, name), 'utf8'));
}

/** A fixture with `detail` fields replaced (undefined deletes a field). */
function withDetail(name: string, patch: Record<string, unknown>): Record<string, unknown> {
  const event = fixture(name);
  const detail: Record<string, unknown> = { ...(event.detail as Record<string, unknown>) };
  for (const [key, value] of Object.entries(patch)) {
    if (value === undefined) delete detail[key];
    else detail[key] = value;
  }
  return { ...event, detail };
}

const EXPECTED: Readonly<Record<string, ParsedEvent>> = {
  'healthlake-create-patient.json': {
    kind: 'change',
    change: {
      eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000001',
      resourceType: 'Patient',
      resourceId: PATIENT_ID,
      interaction: 'create',
      datastoreId: DATASTORE,
      fhirBase: FHIR_BASE,
      time: EVENT_TIME,
    },
  },
  'healthlake-update-patient.json': {
    kind: 'change',
    change: {
      eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000002',
      resourceType: 'Patient',
      resourceId: PATIENT_ID,
      interaction: 'update',
      datastoreId: DATASTORE,
      fhirBase: FHIR_BASE,
      time: EVENT_TIME,
    },
  },
  'healthlake-delete-patient.json': {
    kind: 'change',
    change: {
      eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000003',
      resourceType: 'Patient',
      resourceId: PATIENT_ID,
      interaction: 'delete',
      datastoreId: DATASTORE,
      fhirBase: FHIR_BASE,
      time: EVENT_TIME,
    },
  },
  'healthlake-create-observation.json': {
    kind: 'change',
    change: {
      eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000004',
      resourceType: 'Observation',
      resourceId: 'obs-0001',
      interaction: 'create',
      datastoreId: DATASTORE,
      fhirBase: FHIR_BASE,
      time: EVENT_TIME,
    },
  },
  'healthlake-update-patient-no-resource-id.json': {
    kind: 'change',
    change: {
      eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000005',
      resourceType: 'Patient',
      interaction: 'update',
      datastoreId: DATASTORE,
      fhirBase: FHIR_BASE,
      time: EVENT_TIME,
    },
  },
  'healthlake-read-patient.json': {
    kind: 'ignored',
    eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000006',
    reason: 'ReadResource is not a resource write',
  },
  'healthlake-create-patient-failed.json': {
    kind: 'ignored',
    eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000007',
    reason: 'failed call (ValidationException)',
  },
  'healthlake-import-job-submitted.json': {
    kind: 'ignored',
    eventId: 'a1b2c3d4-5678-90ab-cdef-EXAMPLE11111',
    reason: 'detail-type Import Job Submitted',
  },
};

describe('parseEventBridgeEvent on the HealthLake samples', () => {
  it('has an expectation for every fixture file', () => {
    const files = readdirSync(FIXTURES)
      .filter((f) => f.endsWith('.json'))
      .sort();
    expect(files).toEqual(Object.keys(EXPECTED).sort());
  });

  for (const [file, expected] of Object.entries(EXPECTED)) {
    it(`parses ${file}`, () => {
      expect(parseEventBridgeEvent(fixture(file), RECEIVED_AT)).toEqual(expected);
    });
  }

  it('leaves resourceId out (not undefined) when the event carries none', () => {
    const parsed = parseEventBridgeEvent(fixture('healthlake-update-patient-no-resource-id.json'), RECEIVED_AT);
    expect(parsed.kind === 'change' && Object.hasOwn(parsed.change, 'resourceId')).toBe(false);
  });
});

describe('parseEventBridgeEvent envelopes', () => {
  it.each<[string, unknown]>([
    ['null', null],
    ['a string', 'CreateResource'],
    ['an array', [fixture('healthlake-create-patient.json')]],
    ['an object without id', { source: 'aws.healthlake', 'detail-type': 'AWS API Call via CloudTrail' }],
    ['an empty id', { id: '', source: 'aws.healthlake', 'detail-type': 'AWS API Call via CloudTrail' }],
    ['a numeric id', { id: 7, source: 'aws.healthlake', 'detail-type': 'AWS API Call via CloudTrail' }],
    ['an id longer than 256 characters', { id: 'x'.repeat(257), source: 's', 'detail-type': 'd' }],
    ['an id with a lone surrogate', { id: 'e-\ud800', source: 's', 'detail-type': 'd' }],
    ['an id with a tab', { id: 'e\t1', source: 's', 'detail-type': 'd' }],
    ['an id with a control character', { id: 'e\u00001', source: 's', 'detail-type': 'd' }],
    ['an id that is not ASCII', { id: 'é1', source: 's', 'detail-type': 'd' }],
    ['no source', { id: 'e1', 'detail-type': 'AWS API Call via CloudTrail' }],
    ['no detail-type', { id: 'e1', source: 'aws.healthlake' }],
    ['a detail that is an array', { id: 'e1', source: 'aws.healthlake', 'detail-type': 'x', detail: [] }],
    ['a detail that is a string', { id: 'e1', source: 'aws.healthlake', 'detail-type': 'x', detail: 'd' }],
    ['a numeric time', { id: 'e1', source: 'aws.healthlake', 'detail-type': 'x', time: 1 }],
  ])('throws InvalidEnvelopeError for %s', (_name, input) => {
    expect(() => parseEventBridgeEvent(input, RECEIVED_AT)).toThrow(InvalidEnvelopeError);
  });

  it('names the offending field in the envelope error', () => {
    expect(() => parseEventBridgeEvent({ id: 7, source: 's', 'detail-type': 'd' }, RECEIVED_AT)).toThrow(
      '/id must be string',
    );
  });

  it('says what an id must be rather than quoting the pattern', () => {
    expect(() => parseEventBridgeEvent({ id: 'e-\udc00', source: 's', 'detail-type': 'd' }, RECEIVED_AT)).toThrow(
      new InvalidEnvelopeError('/id must be printable ASCII'),
    );
  });

  it('ignores events from other sources', () => {
    const event = { ...fixture('healthlake-create-patient.json'), source: 'aws.s3' };
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual({
      kind: 'ignored',
      eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000001',
      reason: 'source aws.s3 is not aws.healthlake',
    });
  });

  it('ignores a CloudTrail event without detail', () => {
    const { detail: _detail, ...event } = fixture('healthlake-create-patient.json');
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual({
      kind: 'ignored',
      eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000001',
      reason: 'CloudTrail event without detail',
    });
  });
});

describe('parseEventBridgeEvent details', () => {
  const EVENT_ID = '6f1c2a3b-1d2e-4f50-9a61-000000000001';
  const ignoredBecause = (reason: string): ParsedEvent => ({ kind: 'ignored', eventId: EVENT_ID, reason });
  /** A write that happened but cannot be notified: marked, for the louder log line and its counter. */
  const unusableBecause = (reason: string): ParsedEvent => ({
    kind: 'ignored',
    eventId: EVENT_ID,
    reason,
    unusableWrite: true,
  });

  it('skips read-only calls even when they are named like writes', () => {
    const event = withDetail('healthlake-create-patient.json', { readOnly: true });
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(ignoredBecause('read-only call'));
  });

  it('skips calls with an errorCode', () => {
    const event = withDetail('healthlake-create-patient.json', { errorCode: 'AccessDenied' });
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(ignoredBecause('failed call (AccessDenied)'));
  });

  it('treats a null errorCode as success', () => {
    const parsed = parseEventBridgeEvent(
      withDetail('healthlake-create-patient.json', { errorCode: null }),
      RECEIVED_AT,
    );
    expect(parsed.kind).toBe('change');
  });

  it('skips calls without an eventName', () => {
    const event = withDetail('healthlake-create-patient.json', { eventName: undefined });
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(ignoredBecause('unnamed call is not a resource write'));
  });

  it('does not treat inherited object keys as write calls', () => {
    const event = withDetail('healthlake-create-patient.json', { eventName: 'toString' });
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(ignoredBecause('toString is not a resource write'));
  });

  it('keys a change by its EventBridge id (ARCHITECTURE.md): a copy under another id is another event', () => {
    const first = parseEventBridgeEvent(fixture('healthlake-update-patient.json'), RECEIVED_AT);
    const copy = parseEventBridgeEvent(
      { ...fixture('healthlake-update-patient.json'), id: 'another-eventbridge-id' },
      RECEIVED_AT,
    );
    expect(first.kind === 'change' && first.change.eventId).toBe('6f1c2a3b-1d2e-4f50-9a61-000000000002');
    expect(copy.kind === 'change' && copy.change.eventId).toBe('another-eventbridge-id');
  });

  it.each([
    ['absent', undefined],
    ['not a string', 42],
    ['not an id', 'a b/c'],
    ['another call', '31feacd9-0000-4000-8000-0000000000ff'],
  ])('keys a change by the EventBridge id, with no warning, whatever the eventID (%s)', (_name, eventID) => {
    const parsed = parseEventBridgeEvent(withDetail('healthlake-update-patient.json', { eventID }), RECEIVED_AT);
    expect(parsed.kind === 'change' && parsed.change.eventId).toBe('6f1c2a3b-1d2e-4f50-9a61-000000000002');
    expect(Object.hasOwn(parsed, 'warnings')).toBe(false);
  });

  it('skips ProcessBundle calls, saying they name no resource (not that they write nothing)', () => {
    const event = withDetail('healthlake-create-patient.json', { eventName: 'ProcessBundle' });
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind).toBe('ignored');
    expect(parsed.kind === 'ignored' && parsed.reason).toMatch(
      /^ProcessBundle .*names none of the resources it changed/,
    );
    expect(parsed.kind === 'ignored' && parsed.unusableWrite).toBe(true);
  });

  it.each([
    ['failed', { eventName: 'ProcessBundle', errorCode: 'ValidationException' }, 'failed call (ValidationException)'],
    ['read-only', { eventName: 'ProcessBundle', readOnly: true }, 'read-only call'],
    ['failed', { errorCode: 'AccessDenied', requestParameters: undefined }, 'failed call (AccessDenied)'],
  ])('does not call a %s write unusable: it changed nothing', (_name, patch, reason) => {
    const event = withDetail('healthlake-create-patient.json', patch);
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(ignoredBecause(reason));
  });

  it('reads a PatchResource (FHIR PATCH) as an update of the resource it names', () => {
    const parsed = parseEventBridgeEvent(
      withDetail('healthlake-update-patient.json', { eventName: 'PatchResource' }),
      RECEIVED_AT,
    );
    const update = parseEventBridgeEvent(fixture('healthlake-update-patient.json'), RECEIVED_AT);
    expect(update.kind).toBe('change');
    expect(parsed).toEqual(update);
  });

  it.each([
    ['lower-case', 'patient'],
    ['a path', 'Patient/123'],
    ['a single letter', 'P'],
    ['a number', 42],
  ])('ignores a resourceType that is %s', (_name, resourceType) => {
    const event = withDetail('healthlake-create-patient.json', {
      requestParameters: { datastoreId: DATASTORE, resourceType },
    });
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(
      unusableBecause('CreateResource without a valid requestParameters.resourceType'),
    );
  });

  it('ignores an event without requestParameters', () => {
    const event = withDetail('healthlake-create-patient.json', { requestParameters: undefined });
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(
      unusableBecause('CreateResource without a valid requestParameters.resourceType'),
    );
  });

  it('ignores an invalid datastoreId', () => {
    const event = withDetail('healthlake-create-patient.json', {
      requestParameters: { datastoreId: '../other', resourceType: 'Patient' },
    });
    expect(parseEventBridgeEvent(event, RECEIVED_AT)).toEqual(
      unusableBecause('CreateResource without a valid requestParameters.datastoreId'),
    );
  });

  it('drops a resourceId that is not a FHIR id rather than trusting it, and says so', () => {
    const event = withDetail('healthlake-create-patient.json', { additionalEventData: { resourceId: 'a/b' } });
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed).toEqual({
      kind: 'change',
      change: {
        eventId: '6f1c2a3b-1d2e-4f50-9a61-000000000001',
        resourceType: 'Patient',
        interaction: 'create',
        datastoreId: DATASTORE,
        fhirBase: FHIR_BASE,
        time: EVENT_TIME,
      },
      warnings: ['additionalEventData.resourceId (3 characters) is not a FHIR id: no focus'],
    });
  });

  it.each([
    ['65 characters long', 'a'.repeat(65), '65 characters'],
    ['empty', '', '0 characters'],
    ['a number', 42, 'number'],
  ])('warns about a resourceId that is %s, never quoting it', (_name, resourceId, shape) => {
    const event = withDetail('healthlake-create-patient.json', { additionalEventData: { resourceId } });
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind === 'change' && parsed.warnings).toEqual([
      `additionalEventData.resourceId (${shape}) is not a FHIR id: no focus`,
    ]);
  });

  it('has no warnings for an event without a resource id (the older CloudTrail shape)', () => {
    const parsed = parseEventBridgeEvent(fixture('healthlake-update-patient-no-resource-id.json'), RECEIVED_AT);
    expect(parsed.kind === 'change' && Object.hasOwn(parsed, 'warnings')).toBe(false);
  });

  it('uses receivedAt when neither detail.eventTime nor the envelope time is given', () => {
    const { time: _time, ...event } = withDetail('healthlake-create-patient.json', { eventTime: undefined });
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind === 'change' ? parsed.change.time : undefined).toBe(RECEIVED_AT);
  });

  it('uses receivedAt when the times are not dates', () => {
    const event = { ...withDetail('healthlake-create-patient.json', { eventTime: 'yesterday' }), time: 'soon' };
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind === 'change' ? parsed.change.time : undefined).toBe(RECEIVED_AT);
  });

  it('prefers detail.eventTime over the envelope time, normalised to ISO 8601 UTC', () => {
    const event = {
      ...withDetail('healthlake-create-patient.json', { eventTime: '2024-03-01T10:00:00+02:00' }),
      time: '2024-01-01T00:00:00Z',
    };
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind === 'change' ? parsed.change.time : undefined).toBe('2024-03-01T08:00:00.000Z');
  });

  it('falls back to the envelope time when detail.eventTime is missing', () => {
    const event = {
      ...withDetail('healthlake-create-patient.json', { eventTime: undefined }),
      time: '2024-06-07T08:09:10Z',
    };
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind === 'change' ? parsed.change.time : undefined).toBe('2024-06-07T08:09:10.000Z');
  });

  it('builds fhirBase from detail.awsRegion', () => {
    const event = withDetail('healthlake-create-patient.json', { awsRegion: 'eu-west-2' });
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind === 'change' ? parsed.change.fhirBase : undefined).toBe(
      `https://healthlake.eu-west-2.amazonaws.com/datastore/${DATASTORE}/r4`,
    );
  });

  it('falls back to the envelope region, then us-east-1, when awsRegion is missing or malformed', () => {
    const envelopeRegion = {
      ...withDetail('healthlake-create-patient.json', { awsRegion: undefined }),
      region: 'ap-southeast-2',
    };
    const parsedRegion = parseEventBridgeEvent(envelopeRegion, RECEIVED_AT);
    expect(parsedRegion.kind === 'change' ? parsedRegion.change.fhirBase : undefined).toBe(
      `https://healthlake.ap-southeast-2.amazonaws.com/datastore/${DATASTORE}/r4`,
    );
    const badRegion = withDetail('healthlake-create-patient.json', { awsRegion: 'evil.example.com/x' });
    const parsedBad = parseEventBridgeEvent(badRegion, RECEIVED_AT);
    expect(parsedBad.kind === 'change' ? parsedBad.change.fhirBase : undefined).toBe(FHIR_BASE);
  });

  it.each([
    ['empty', ''],
    ['malformed', 'evil.example.com/x'],
    ['not a string', 7],
  ])('takes the envelope region when awsRegion is %s', (_name, awsRegion) => {
    const event = { ...withDetail('healthlake-create-patient.json', { awsRegion }), region: 'eu-west-1' };
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed.kind === 'change' ? parsed.change.fhirBase : undefined).toBe(
      `https://healthlake.eu-west-1.amazonaws.com/datastore/${DATASTORE}/r4`,
    );
    expect(parsed.kind === 'change' && Object.hasOwn(parsed, 'warnings')).toBe(false);
  });

  it('assumes us-east-1, and says so, when neither awsRegion nor the envelope region is a region', () => {
    const event = { ...withDetail('healthlake-create-patient.json', { awsRegion: '' }), region: '' };
    const parsed = parseEventBridgeEvent(event, RECEIVED_AT);
    expect(parsed).toMatchObject({
      change: { fhirBase: FHIR_BASE },
      warnings: ['neither detail.awsRegion nor region is an AWS region: us-east-1 assumed'],
    });
  });
});
