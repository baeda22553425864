import { describe, expect, it } from 'vitest';
import { MAX_BATCH_EVENTS, readReplayInput } from './replay-input.js';

const event = (id: string) => ({ id, source: 'aws.healthlake', 'detail-type': 'AWS API Call via CloudTrail' });
const failureRecord = (payload: unknown) => ({
  version: '1.0',
  timestamp: '2026-11-29T10:00:00.000Z',
  requestContext: { requestId: 'r-1', condition: 'RetriesExhausted', approximateInvokeCount: 3 },
  requestPayload: payload,
  responseContext: { statusCode: 200, functionError: 'Unhandled' },
  responsePayload: { errorType: 'Error', errorMessage: 'boom' },
});

describe('readReplayInput', () => {
  it('reads one event as one batch, and an array in batches of at most 100', () => {
    expect(readReplayInput('one.json', JSON.stringify(event('a')))).toEqual({
      batches: [{ source: 'one.json', events: [event('a')] }],
      skipped: [],
      leftOut: [],
    });
    const many = Array.from({ length: 2 * MAX_BATCH_EVENTS + 1 }, (_, i) => event(`e${i}`));
    const { batches } = readReplayInput('many.json', JSON.stringify(many));
    expect(batches.map((b) => [b.source, b.events.length])).toEqual([
      ['many.json#0-99', 100],
      ['many.json#100-199', 100],
      ['many.json#200', 1],
    ]);
    expect(batches.flatMap((b) => b.events)).toEqual(many);
  });

  it('reads one JSON value per line, naming each line, and skips a line that is not JSON', () => {
    const text = `${JSON.stringify(event('a'))}\n\n{"id": oops}\n${JSON.stringify([event('b'), event('c')])}\n`;
    const { batches, skipped } = readReplayInput('log.ndjson', text);
    expect(batches).toEqual([
      { source: 'log.ndjson:1', events: [event('a')] },
      { source: 'log.ndjson:4', events: [event('b'), event('c')], file: 'log.ndjson:4', first: 0 },
    ]);
    expect(skipped).toEqual([{ source: 'log.ndjson:3', reason: expect.stringMatching(/^not JSON \(/) }]);
  });

  it("unwraps Lambda's failure records and the broker's Refused ones; one left out is skipped, saying why", () => {
    const omitted = {
      version: '1.0',
      timestamp: '2026-11-29T10:00:00.000Z',
      requestContext: { condition: 'Refused' },
      requestPayloadOmitted: { bytes: 300_000, events: 2, ids: ['x', 'y'] },
      responsePayload: { errorType: 'INVALID_EVENT', errorMessage: 'too large' },
    };
    const text = [failureRecord(event('a')), failureRecord([event('b'), event('c')]), omitted]
      .map((r) => JSON.stringify(r))
      .join('\n');
    expect(readReplayInput('dlq.ndjson', text)).toEqual({
      batches: [
        { source: 'dlq.ndjson:1', events: [event('a')] },
        { source: 'dlq.ndjson:2', events: [event('b'), event('c')], file: 'dlq.ndjson:2', first: 0 },
      ],
      skipped: [{ source: 'dlq.ndjson:3', reason: 'a record whose event was left out (too large for the queue)' }],
      leftOut: [],
    });
  });

  it('reads `aws sqs receive-message` output and an SQS batch, each body an event or a record', () => {
    const received = {
      Messages: [
        { MessageId: 'm1', ReceiptHandle: 'h1', Body: JSON.stringify(event('a')) },
        { MessageId: 'm2', ReceiptHandle: 'h2', Body: JSON.stringify(failureRecord(event('b'))) },
        { MessageId: 'm3', ReceiptHandle: 'h3', Body: 'not json' },
        { MessageId: 'm4', ReceiptHandle: 'h4' },
      ],
    };
    const { batches, skipped } = readReplayInput('dlq.json', JSON.stringify(received));
    expect(batches).toEqual([
      { source: 'dlq.json#0', events: [event('a')] },
      { source: 'dlq.json#1', events: [event('b')] },
    ]);
    expect(skipped).toEqual([
      { source: 'dlq.json#2', reason: expect.stringMatching(/^its body is not JSON \(/) },
      { source: 'dlq.json#3', reason: 'an SQS message without a body' },
    ]);
    const batch = { Records: [{ eventSource: 'aws:sqs', messageId: 'm1', body: JSON.stringify(event('c')) }] };
    expect(readReplayInput('batch.json', JSON.stringify(batch)).batches).toEqual([
      { source: 'batch.json#0', events: [event('c')] },
    ]);
  });

  it('reads a file that starts with a byte-order mark, and pretty-printed dumps appended one after another', () => {
    expect(readReplayInput('bom.json', `\uFEFF${JSON.stringify(event('a'), null, 2)}`).batches).toEqual([
      { source: 'bom.json', events: [event('a')] },
    ]);
    const dump = (id: string) =>
      JSON.stringify({ Messages: [{ MessageId: `m-${id}`, Body: JSON.stringify(event(id)) }] }, null, 4);
    // As `aws sqs receive-message >> dlq.json` twice leaves it; a brace inside a string does not cut it.
    const appended = `${dump('a')}\n${dump('b}{')}\n`;
    expect(readReplayInput('dlq.json', appended)).toEqual({
      batches: [
        { source: 'dlq.json#0#0', events: [event('a')] },
        { source: 'dlq.json#1#0', events: [event('b}{')] },
      ],
      skipped: [],
      leftOut: [],
    });
  });

  it('makes the EventBridge event of each HealthLake write in a CloudTrail log file; leaves out, and counts, the rest', () => {
    const record = (eventID: string, overrides: Record<string, unknown> = {}) => ({
      eventVersion: '1.09',
      userIdentity: { type: 'AssumedRole', accountId: '111122223333' },
      eventTime: '2026-11-29T10:00:00Z',
      eventSource: 'healthlake.amazonaws.com',
      eventName: 'UpdateResource',
      awsRegion: 'eu-west-1',
      requestParameters: { datastoreId: 'abcdef01234567890abcdef012345678', resourceType: 'Patient' },
      additionalEventData: { resourceId: 'p1' },
      eventID,
      readOnly: false,
      recipientAccountId: '111122223333',
      eventCategory: 'Data',
      ...overrides,
    });
    const trail = {
      Records: [
        record('w1'),
        record('s3', { eventSource: 's3.amazonaws.com', eventName: 'GetObject' }),
        record('r1', { eventName: 'ReadResource', readOnly: true }),
        record('r2', { eventName: 'SearchWithGet', readOnly: true }),
        record('w2', { eventName: 'DeleteResource', recipientAccountId: undefined }),
      ],
    };
    const { batches, skipped, leftOut } = readReplayInput('trail.json', JSON.stringify(trail));
    expect(skipped).toEqual([]);
    expect(leftOut).toEqual([
      { source: 'trail.json', reason: 'calls to other services than HealthLake', count: 1 },
      { source: 'trail.json', reason: 'read-only HealthLake calls', count: 2 },
    ]);
    expect(batches).toHaveLength(1);
    const [w1, w2] = (batches[0]?.events ?? []) as Record<string, unknown>[];
    expect(w1).toEqual({
      version: '0',
      id: 'cloudtrail-w1',
      'detail-type': 'AWS API Call via CloudTrail',
      source: 'aws.healthlake',
      account: '111122223333',
      time: '2026-11-29T10:00:00Z',
      region: 'eu-west-1',
      resources: [],
      detail: record('w1'),
    });
    // No recipientAccountId: the caller's account.
    expect([w2?.id, w2?.account]).toEqual(['cloudtrail-w2', '111122223333']);
    // Only other services' calls: nothing to send, and nothing failed.
    const others = { Records: [record('s', { eventSource: 'iam.amazonaws.com' })] };
    expect(readReplayInput('iam.json', JSON.stringify(others))).toEqual({
      batches: [],
      skipped: [],
      leftOut: [{ source: 'iam.json', reason: 'calls to other services than HealthLake', count: 1 }],
    });
  });

  it('leaves anything else to the broker as an event, and skips what cannot be one', () => {
    // `Records` that are neither SQS messages nor CloudTrail records (no eventVersion, eventID): sent as is.
    const trail = { Records: [{ eventSource: 'healthlake.amazonaws.com', eventName: 'CreateResource' }] };
    expect(readReplayInput('trail.json', JSON.stringify(trail)).batches).toEqual([
      { source: 'trail.json', events: [trail] },
    ]);
    // Nor are empty lists, or `Messages` without message ids: an event that happens to have such a key.
    for (const odd of [{ Records: [] }, { Messages: [] }, { id: 'e', Messages: [{ text: 'hi' }] }]) {
      expect(readReplayInput('odd.json', JSON.stringify(odd)).batches).toEqual([{ source: 'odd.json', events: [odd] }]);
    }
    expect(readReplayInput('x', '42\nnull\n"text"\n[]').skipped.map((s) => s.reason)).toEqual([
      'not an event (a JSON number)',
      'not an event (a JSON null)',
      'not an event (a JSON string)',
      'an empty array',
    ]);
    expect(readReplayInput('empty', '')).toEqual({ batches: [], skipped: [], leftOut: [] });
  });
});
