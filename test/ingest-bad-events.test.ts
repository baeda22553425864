import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventLike, fixture, type Json } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';

/**
 * Bad event input leaves a trace for the operator: a refused request is logged (where and why,
 * never the event) and counted in `/metrics`; an accepted event with a part the broker could not
 * use is logged with its id.
 */

describe('POST /events: what bad input leaves behind', () => {
  let test: TestBroker;

  beforeAll(async () => {
    test = await inProcessBroker();
  });

  afterAll(async () => {
    await test?.broker.close(0);
  });

  const post = async (body: unknown): Promise<{ status: number; body: Json }> => {
    const res = await test.broker.app.request('/events', {
      method: 'POST',
      headers: { authorization: `Bearer ${TOKENS.ingest}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    return { status: res.status, body: (await res.json()) as Json };
  };

  const metrics = async (): Promise<string> => {
    const res = await test.broker.app.request('/metrics', { headers: { authorization: `Bearer ${TOKENS.ingest}` } });
    return res.text();
  };

  it('logs a refused batch with the index and reason of the bad event, never the event, and counts its events', async () => {
    const since = test.logger.mark();
    const bad = { id: 'bad-1', source: 'aws.healthlake', detail: { sessionToken: 'sentinel-secret' } };
    const res = await post([eventLike('healthlake-update-patient', 'good-1'), bad, fixture('healthlake-read-patient')]);
    expect(res.status).toBe(400);
    const records = test.logger.records.slice(since);
    expect(records).toEqual([
      {
        level: 'warn',
        msg: 'events refused',
        events: 3,
        index: 1,
        reason: "(event) must have required property 'detail-type'",
      },
    ]);
    expect(JSON.stringify(records)).not.toContain('sentinel-secret');
    expect(await metrics()).toContain('broker_events_total{outcome="refused"} 3\n');
  });

  it('logs and counts a request of more than 1,000 events', async () => {
    const since = test.logger.mark();
    const res = await post(Array.from({ length: 1001 }, () => ({})));
    expect(res.status).toBe(413);
    expect(test.logger.records.slice(since)).toEqual([
      { level: 'warn', msg: 'events refused', events: 1001, reason: '1001 events in one request; the limit is 1000' },
    ]);
    expect(await metrics()).toContain('broker_events_total{outcome="refused"} 1004\n');
  });

  it('warns about and counts a successful write it cannot notify (no resource type, a batch Bundle); a failed one stays a quiet ignore', async () => {
    const since = test.logger.mark();
    const noType = eventLike('healthlake-create-patient', 'no-type-1') as Json & { detail: Json };
    noType.detail = { ...noType.detail, requestParameters: { datastoreId: 'abcdef01' } };
    const bundle = eventLike('healthlake-create-patient', 'bundle-1') as Json & { detail: Json };
    bundle.detail = { ...bundle.detail, eventName: 'ProcessBundle' };
    const failed = eventLike('healthlake-create-patient', 'failed-1') as Json & { detail: Json };
    failed.detail = { ...failed.detail, eventName: 'ProcessBundle', errorCode: 'ValidationException' };
    const res = await post([noType, bundle, failed]);
    expect(res).toEqual({ status: 202, body: { accepted: 0, ignored: 3, duplicates: 0 } });
    expect(test.logger.records.slice(since).filter((r) => r.level !== 'debug')).toEqual([
      {
        level: 'warn',
        msg: 'write event unusable: no notification derived',
        eventId: 'no-type-1',
        reason: 'CreateResource without a valid requestParameters.resourceType',
      },
      {
        level: 'warn',
        msg: 'write event unusable: no notification derived',
        eventId: 'bundle-1',
        reason: expect.stringMatching(/^ProcessBundle .*names none of the resources it changed/),
      },
      { level: 'info', msg: 'event ignored', eventId: 'failed-1', reason: 'failed call (ValidationException)' },
    ]);
    const text = await metrics();
    expect(text).toContain('broker_unusable_writes_total 2\n');
    expect(text).toContain('broker_events_total{outcome="ignored"} 3\n');
  });

  it('accepts an event whose resourceId is not a FHIR id, and warns naming the event', async () => {
    const since = test.logger.mark();
    const res = await post(eventLike('healthlake-update-patient', 'odd-id-1', 'a'.repeat(65)));
    expect(res).toEqual({ status: 202, body: { accepted: 1, ignored: 0, duplicates: 0 } });
    expect(test.logger.records.slice(since).filter((r) => r.level !== 'debug')).toEqual([
      {
        level: 'warn',
        msg: 'event accepted with a part left out',
        eventId: 'odd-id-1',
        warning: 'additionalEventData.resourceId (65 characters) is not a FHIR id: no focus',
      },
    ]);
  });
});
