import { SQSClient } from '@aws-sdk/client-sqs';
import { afterEach, describe, expect, it } from 'vitest';
import { SqsEventSource } from '../src/aws/sqs-source.js';
import { Metrics } from '../src/observability/metrics.js';
import { SqsDouble } from './support/aws-doubles.js';
import { startBroker } from './support/broker-process.js';
import { eventLike, fixture, notifiedNumbers, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, type TestBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * Events pulled from SQS (BROKER_SQS_QUEUE_URL): the real broker and a real receiver, with a
 * stand-in for the SQS endpoint (none runs here) whose requests are asserted exactly.
 */

const QUEUE_URL = 'https://sqs.eu-west-1.amazonaws.com/111122223333/fhir-events';
const RECEIVE = {
  QueueUrl: QUEUE_URL,
  MaxNumberOfMessages: 10,
  WaitTimeSeconds: 20,
  MessageSystemAttributeNames: ['ApproximateReceiveCount'],
};

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function sqsClient(sqs: SqsDouble): SQSClient {
  const client = new SQSClient({
    region: 'eu-west-1',
    endpoint: sqs.url,
    credentials: { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'secret-example' },
  });
  cleanups.push(async () => client.destroy());
  return client;
}

async function setup(): Promise<{ t: TestBroker; sqs: SqsDouble; receiver: Receiver }> {
  const sqs = await SqsDouble.start();
  const receiver = await Receiver.start();
  const t = await inProcessBroker({ BROKER_SQS_QUEUE_URL: QUEUE_URL }, { sqs: sqsClient(sqs) });
  cleanups.push(
    () => sqs.close(),
    () => receiver.close(),
    () => t.broker.close(0),
  );
  await t.broker.start();
  t.broker.startSources();
  return { t, sqs, receiver };
}

/**
 * A started SQS source on its own queue stand-in whose ingest resolves `ingesting` when it is
 * first called, then answers only once `until` has resolved.
 */
async function sourceWithHeldIngest(
  until: Promise<unknown>,
  logger = new RecordingLogger(),
): Promise<{ sqs: SqsDouble; source: SqsEventSource; ingesting: Promise<void> }> {
  const sqs = await SqsDouble.start();
  cleanups.push(() => sqs.close());
  let started: () => void = () => undefined;
  const ingesting = new Promise<void>((resolve) => {
    started = resolve;
  });
  const source = new SqsEventSource({
    client: sqsClient(sqs),
    queueUrl: QUEUE_URL,
    logger,
    metrics: new Metrics(),
    ingest: async () => {
      started();
      await until;
      return { accepted: 1, ignored: 0, duplicates: 0 };
    },
  });
  source.start();
  return { sqs, source, ingesting };
}

const deletes = (sqs: SqsDouble) => sqs.calls.filter((c) => c.target === 'AmazonSQS.DeleteMessageBatch');

describe('the SQS source', () => {
  it('takes each event through the same ingest and deletes its message once committed', async () => {
    const { t, sqs, receiver } = await setup();
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/sqs`, { filters: ['Patient?_id=sqs-p'] }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    const ids = sqs.send(
      JSON.stringify(eventLike('healthlake-update-patient', 'sqs-1', 'sqs-p')),
      JSON.stringify(fixture('healthlake-read-patient')),
    );
    await sqs.waitFor(() => sqs.deleted.length === 2, 'both messages deleted');
    expect(sqs.deleted.sort()).toEqual([...ids].sort());
    await receiver.waitFor(() => receiver.on('/sqs').length >= 2, 'the notification');
    const notified = receiver.on('/sqs').filter((r) => r.body.includes('"event-notification"'));
    expect(notifiedNumbers(notified)).toEqual([1]);
    expect([
      t.broker.metrics.value('broker_events_total', { outcome: 'accepted' }),
      t.broker.metrics.value('broker_events_total', { outcome: 'ignored' }),
    ]).toEqual([1, 1]);
    // Exactly these calls: long polls, and one delete of both messages' receipt handles.
    const receives = sqs.calls.filter((c) => c.target === 'AmazonSQS.ReceiveMessage');
    expect(receives.length).toBeGreaterThanOrEqual(1);
    for (const r of receives) expect(r.body).toEqual(RECEIVE);
    expect(deletes(sqs)).toHaveLength(1);
    const [deleteCall] = deletes(sqs);
    expect(deleteCall?.body).toEqual({
      QueueUrl: QUEUE_URL,
      Entries: [
        { Id: '0', ReceiptHandle: expect.any(String) },
        { Id: '1', ReceiptHandle: expect.any(String) },
      ],
    });
    expect(sqs.calls.every((c) => c.authorization?.startsWith('AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/'))).toBe(true);
  });

  it('leaves a message that is no event in the queue (for its redrive policy), says why, and takes the rest', async () => {
    const { t, sqs } = await setup();
    const [notJson, notEvent, array, good] = sqs.send(
      'not json',
      JSON.stringify({ version: '0' }),
      JSON.stringify([fixture('healthlake-update-patient')]),
      JSON.stringify(eventLike('healthlake-update-patient', 'sqs-good', 'sqs-g')),
    );
    await sqs.waitFor(() => sqs.deleted.length === 1, 'the good one deleted');
    expect(sqs.deleted).toEqual([good]);
    const refused = t.logger.records.filter(
      (r) => r.msg === "sqs message refused; left for the queue's redrive policy",
    );
    expect(refused.map((r) => [r.messageId, r.receiveCount, typeof r.reason]).sort()).toEqual(
      [
        [notJson, 1, 'string'],
        [notEvent, 1, 'string'],
        [array, 1, 'string'],
      ].sort(),
    );
    expect(refused.find((r) => r.messageId === notJson)?.reason).toBe('the body is not JSON');
    expect(refused.find((r) => r.messageId === array)?.reason).toBe('the body is an array, not one EventBridge event');
    expect(sqs.undeleted.map((m) => m.MessageId).sort()).toEqual([notJson, notEvent, array].sort());
    expect(t.broker.metrics.value('broker_events_total', { outcome: 'refused' })).toBe(3);
    // No log line carries a message body.
    expect(JSON.stringify(t.logger.records)).not.toContain('not json');

    // Handed out again (their visibility timeout over): said again, with the receive count, but
    // counted once per message, not once per receive.
    const mark = t.logger.mark();
    const refusedAgain = () => t.logger.records.slice(mark).filter((r) => r.msg === refused[0]?.msg);
    sqs.redeliverUndeleted();
    await t.logger.waitFor(() => refusedAgain().length === 3, 'the three refused again', 10_000, mark);
    expect(
      refusedAgain()
        .map((r) => [r.messageId, r.receiveCount])
        .sort(),
    ).toEqual(
      [
        [notJson, 2],
        [notEvent, 2],
        [array, 2],
      ].sort(),
    );
    expect(t.broker.metrics.value('broker_events_total', { outcome: 'refused' })).toBe(3);
  });

  it('takes a committed message whose delete failed again as a duplicate: delivered once', async () => {
    const { t, sqs, receiver } = await setup();
    const sub = await t.create(
      topicSubscription('patient-change', `${receiver.url}/again`, { filters: ['Patient?_id=again-p'] }),
    );
    await t.logger.waitForStatus(sub.id as string, 'active');
    const [id] = sqs.send(JSON.stringify(eventLike('healthlake-update-patient', 'sqs-again', 'again-p')));
    sqs.failDeletes.add(id as string);
    const notDeleted = await t.logger.waitFor(
      (r) => r.msg === 'sqs message not deleted; it comes back and counts as a duplicate',
      'the failed delete',
      10_000,
    );
    expect([notDeleted.messageId, notDeleted.code]).toEqual([id, 'InternalError']);
    sqs.redeliverUndeleted();
    await sqs.waitFor(() => sqs.deleted.includes(id as string), 'deleted the second time');
    expect(t.broker.metrics.value('broker_events_total', { outcome: 'duplicate' })).toBe(1);
    await receiver.waitFor(() => receiver.on('/again').length >= 2, 'the notification');
    // A moment for a second notification, were there one.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(notifiedNumbers(receiver.on('/again').filter((r) => r.body.includes('"event-notification"')))).toEqual([1]);
  });
});

describe('the server with BROKER_SQS_QUEUE_URL', () => {
  it('pulls from the queue as the server process starts, and on SIGTERM stops and exits cleanly', async () => {
    const sqs = await SqsDouble.start();
    cleanups.push(() => sqs.close());
    const broker = await startBroker({
      BROKER_SQS_QUEUE_URL: QUEUE_URL,
      SQS_ENDPOINT: sqs.url,
      AWS_ACCESS_KEY_ID: 'AKIDEXAMPLE',
      AWS_SECRET_ACCESS_KEY: 'secret-example',
    });
    cleanups.push(() => broker.kill('SIGKILL').then(() => undefined));
    await broker.waitForLog((r) => r.msg === 'sqs source started', 'the source');
    const [id] = sqs.send(JSON.stringify(fixture('healthlake-update-patient')));
    await sqs.waitFor(() => sqs.deleted.includes(id as string), 'the message deleted');
    // The queue URL names eu-west-1: the requests are signed for it, whatever AWS_REGION says.
    expect(sqs.calls[0]?.authorization).toMatch(/^AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE\/\d{8}\/eu-west-1\/sqs\//);
    expect(await broker.kill('SIGTERM')).toBe(0);
    expect(broker.logs.map((r) => r.msg)).toContain('sqs source stopped');
  });
});

describe('SqsEventSource', () => {
  it('keeps a message the store failed to take in hand, invisible, and takes it once the store is back', async () => {
    const sqs = await SqsDouble.start();
    cleanups.push(() => sqs.close());
    const logger = new RecordingLogger();
    let failuresLeft = 2;
    const ingested: unknown[] = [];
    const source = new SqsEventSource({
      client: sqsClient(sqs),
      queueUrl: QUEUE_URL,
      logger,
      metrics: new Metrics(),
      ingest: async (event) => {
        if (failuresLeft-- > 0) throw new Error('disk I/O error');
        ingested.push(event);
        return { accepted: 1, ignored: 0, duplicates: 0 };
      },
    });
    source.start();
    cleanups.push(() => source.close());
    const [id] = sqs.send(JSON.stringify(fixture('healthlake-update-patient')));
    await sqs.waitFor(() => sqs.deleted.includes(id as string), 'deleted once taken');
    expect(ingested).toEqual([fixture('healthlake-update-patient')]);
    const failed = logger.records.filter(
      (r) => r.msg === 'sqs messages not taken: the store failed; kept and tried again',
    );
    expect(failed.map((r) => [r.messageIds, r.retryInMs, (r.err as Error).message])).toEqual([
      [[id], 1_000, 'disk I/O error'],
      [[id], 2_000, 'disk I/O error'],
    ]);
    // Received once: its visibility extended before each wait, never handed out again meanwhile.
    expect(sqs.receives.get(id as string)).toBe(1);
    expect(
      sqs.calls
        .filter((c) => c.target === 'AmazonSQS.ChangeMessageVisibilityBatch')
        .map((c) => (c.body.Entries as { VisibilityTimeout: number }[]).map((e) => e.VisibilityTimeout)),
    ).toEqual([[31], [32]]);
    expect(sqs.deleted).toEqual([id]);
    expect(sqs.undeleted).toEqual([]);
  });

  it('commits and deletes what it had received before close resolves, and receives nothing after', async () => {
    let release: () => void = () => undefined;
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    const { sqs, source, ingesting } = await sourceWithHeldIngest(held);
    const ids = sqs.send(
      JSON.stringify(eventLike('healthlake-update-patient', 'close-1', 'c-1')),
      JSON.stringify(eventLike('healthlake-update-patient', 'close-2', 'c-2')),
    );
    await ingesting;
    const closed = source.close();
    const receivesAtClose = sqs.calls.filter((c) => c.target === 'AmazonSQS.ReceiveMessage').length;
    release();
    await closed;
    expect(sqs.deleted.sort()).toEqual([...ids].sort());
    expect(sqs.calls.filter((c) => c.target === 'AmazonSQS.ReceiveMessage')).toHaveLength(receivesAtClose);
  });

  it('does not let a store that hangs hold the shutdown: close gives up after its grace, and says so', async () => {
    const logger = new RecordingLogger();
    // A commit that never comes back.
    const { sqs, source, ingesting } = await sourceWithHeldIngest(new Promise(() => {}), logger);
    const [id] = sqs.send(JSON.stringify(eventLike('healthlake-update-patient', 'hung-1', 'h-1')));
    await ingesting;
    const t0 = performance.now();
    await source.close(200);
    expect(performance.now() - t0).toBeLessThan(5_000);
    expect(logger.records.filter((r) => String(r.msg).startsWith('sqs source stopped with messages still'))).toEqual([
      expect.objectContaining({ level: 'warn', queueUrl: QUEUE_URL, graceMs: 200 }),
    ]);
    // Not deleted: the queue hands it out again.
    expect(sqs.deleted).toEqual([]);
    expect(sqs.undeleted.map((m) => m.MessageId)).toEqual([id]);
  });

  it('keeps as many long polls out as it has pollers, and takes every message once', async () => {
    const sqs = await SqsDouble.start();
    cleanups.push(() => sqs.close());
    const ingested: unknown[] = [];
    const source = new SqsEventSource({
      client: sqsClient(sqs),
      queueUrl: QUEUE_URL,
      logger: new RecordingLogger(),
      metrics: new Metrics(),
      pollers: 3,
      ingest: async (event) => {
        ingested.push(event);
        return { accepted: 1, ignored: 0, duplicates: 0 };
      },
    });
    source.start();
    cleanups.push(() => source.close());
    while (sqs.requests.length < 3) await new Promise((resolve) => setTimeout(resolve, 10));
    // Three receives out at once, none answered yet.
    expect([sqs.requests.length, sqs.answered.length]).toEqual([3, 0]);
    const ids = sqs.send(
      ...Array.from({ length: 25 }, (_, i) => JSON.stringify(eventLike('healthlake-update-patient', `many-${i}`))),
    );
    await sqs.waitFor(() => sqs.deleted.length === 25, 'all 25 deleted');
    expect(sqs.deleted.sort()).toEqual([...ids].sort());
    expect(ingested).toHaveLength(25);
    expect([...sqs.receives.values()].every((n) => n === 1)).toBe(true);
  });

  it('cuts a long poll at close, and retries a failed receive with a growing pause', async () => {
    const sqs = await SqsDouble.start();
    cleanups.push(() => sqs.close());
    const logger = new RecordingLogger();
    // A 20 s long poll: close must not wait for it (this test would time out).
    const polling = new SqsEventSource({
      client: sqsClient(sqs),
      queueUrl: QUEUE_URL,
      logger,
      metrics: new Metrics(),
      ingest: async () => ({ accepted: 0, ignored: 1, duplicates: 0 }),
    });
    polling.start();
    await logger.waitFor((r) => r.msg === 'sqs source started', 'started');
    while (sqs.requests.length === 0) await new Promise((resolve) => setTimeout(resolve, 10));
    const closing = Date.now();
    await polling.close();
    // Cut, not waited out (the double holds the poll its 20 s).
    expect(Date.now() - closing).toBeLessThan(10_000);
    expect(logger.records.map((r) => r.msg)).toContain('sqs source stopped');

    // Nothing listens on the queue's endpoint: receives fail, each logged with its next pause.
    const gone = await SqsDouble.start();
    const url = gone.url;
    await gone.close();
    const failing = new SqsEventSource({
      client: new SQSClient({
        region: 'eu-west-1',
        endpoint: url,
        credentials: { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'secret-example' },
        maxAttempts: 1,
      }),
      queueUrl: QUEUE_URL,
      logger,
      metrics: new Metrics(),
      ingest: async () => ({ accepted: 0, ignored: 1, duplicates: 0 }),
    });
    failing.start();
    await logger.waitFor(
      () => logger.records.filter((r) => r.msg === 'sqs receive failed').length >= 2,
      'two failed receives',
      10_000,
    );
    await failing.close();
    const pauses = logger.records.filter((r) => r.msg === 'sqs receive failed').map((r) => r.retryInMs);
    expect(pauses.slice(0, 2)).toEqual([1_000, 2_000]);
  });
});
