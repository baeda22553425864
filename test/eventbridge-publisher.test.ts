import { EventBridgeClient } from '@aws-sdk/client-eventbridge';
import { afterEach, describe, expect, it } from 'vitest';
import { EventBridgePublisher } from '../src/aws/eventbridge-publisher.js';
import type { LifecycleEvent } from '../src/core/lifecycle.js';
import { EventBridgeDouble } from './support/aws-doubles.js';
import { fixture, topicSubscription } from './support/fhir-client.js';
import { inProcessBroker } from './support/in-process.js';
import { Receiver } from './support/receiver.js';
import { RecordingLogger } from './support/recording-logger.js';

/**
 * Lifecycle events reach EventBridge as PutEvents batches of at most 10, with failed entries
 * retried alone; the broker emits them on status changes, dead letters and disabled endpoints.
 */

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function double(): Promise<{ eb: EventBridgeDouble; client: EventBridgeClient }> {
  const eb = await EventBridgeDouble.start();
  const client = new EventBridgeClient({
    endpoint: eb.url,
    region: 'us-east-1',
    credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
  });
  cleanups.push(async () => {
    client.destroy();
    await eb.close();
  });
  return { eb, client };
}

const statusChanged = (i: number): LifecycleEvent => ({
  type: 'Subscription Status Changed',
  subscriptionId: `sub-${i}`,
  owner: 'alice',
  from: 'requested',
  to: 'active',
  time: '2026-11-26T12:00:00.000Z',
});

describe('EventBridgePublisher', () => {
  it('sends batches of ten with the documented source, detail-type and bus', async () => {
    const { eb, client } = await double();
    const publisher = new EventBridgePublisher({
      client,
      bus: 'fhir-broker-events',
      logger: new RecordingLogger(),
      sleep: async () => {},
    });
    for (let i = 0; i < 23; i++) publisher.publish(statusChanged(i));
    await publisher.flush();
    expect(eb.entries.map((batch) => batch.length)).toEqual([10, 10, 3]);
    expect(eb.entries[0]?.[0]).toEqual({
      Source: 'fhir-subscription-broker',
      DetailType: 'Subscription Status Changed',
      Detail: JSON.stringify({ subscriptionId: 'sub-0', owner: 'alice', from: 'requested', to: 'active' }),
      EventBusName: 'fhir-broker-events',
      Time: 1795694400,
    });
    expect(eb.requests[0]?.headers['x-amz-target']).toBe('AWSEvents.PutEvents');
    expect(eb.requests[0]?.headers.authorization).toMatch(
      /^AWS4-HMAC-SHA256 Credential=local\/\d{8}\/us-east-1\/events\/aws4_request/,
    );
  });

  it('retries only the entries EventBridge rejected', async () => {
    const { eb, client } = await double();
    const logger = new RecordingLogger();
    const publisher = new EventBridgePublisher({ client, bus: 'b', logger, sleep: async () => {} });
    eb.failNext = 2;
    for (let i = 0; i < 4; i++) publisher.publish(statusChanged(i));
    await publisher.flush();
    const ids = eb.entries.map((batch) =>
      batch.map((e) => (JSON.parse(e.Detail) as { subscriptionId: string }).subscriptionId),
    );
    expect(ids).toEqual([
      ['sub-0', 'sub-1', 'sub-2', 'sub-3'],
      ['sub-0', 'sub-1'],
    ]);
    expect(logger.records.filter((r) => r.msg === 'lifecycle events partly rejected')).toHaveLength(1);
  });

  it('gives up after four attempts and logs what it dropped, without throwing', async () => {
    const { eb, client } = await double();
    const logger = new RecordingLogger();
    const publisher = new EventBridgePublisher({ client, bus: 'b', logger, sleep: async () => {} });
    eb.failNext = 100;
    publisher.publish(statusChanged(1));
    await publisher.flush();
    expect(eb.requests).toHaveLength(4);
    expect(logger.records.find((r) => r.msg === 'lifecycle events dropped after retries')).toMatchObject({
      count: 1,
      detailTypes: ['Subscription Status Changed'],
    });
  });

  it('receives the broker’s status changes, dead letters and disabled endpoints', async () => {
    const { eb, client } = await double();
    const receiver = await Receiver.start();
    cleanups.push(() => receiver.close());
    const publisher = new EventBridgePublisher({
      client,
      bus: 'fhir-broker-events',
      logger: new RecordingLogger(),
      sleep: async () => {},
    });
    const t = await inProcessBroker({ BROKER_RETRY_DELAYS: '10ms' }, { lifecycle: publisher });
    cleanups.push(() => t.broker.close(0));
    const dead = await t.create(topicSubscription('patient-change', `${receiver.url}/dead`));
    const gone = await t.create(topicSubscription('patient-change', `${receiver.url}/gone`));
    await t.logger.waitForStatus(dead.id as string, 'active');
    await t.logger.waitForStatus(gone.id as string, 'active');
    receiver.respond = (req) => ({ status: req.path === '/gone' ? 410 : 500 });
    await t.post([{ ...fixture('healthlake-update-patient'), id: 'eb-1' }]);
    await t.logger.waitForStatus(dead.id as string, 'error');
    await t.logger.waitForStatus(gone.id as string, 'off');
    await publisher.flush();
    const events = eb.entries
      .flat()
      .map((e) => [e.DetailType, (JSON.parse(e.Detail) as { subscriptionId: string }).subscriptionId]);
    expect(events).toEqual(
      expect.arrayContaining([
        ['Subscription Status Changed', dead.id],
        ['Subscription Status Changed', gone.id],
        ['Notification Dead-Lettered', dead.id],
        ['Endpoint Disabled', gone.id],
      ]),
    );
    const disabled = eb.entries.flat().find((e) => e.DetailType === 'Endpoint Disabled');
    expect(JSON.parse(disabled?.Detail ?? '{}')).toEqual({
      subscriptionId: gone.id,
      owner: 'alice',
      endpointOrigin: receiver.url,
      reason: 'endpoint answered 410 Gone',
    });
  });
});
