import { afterEach, describe, expect, it } from 'vitest';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';

/**
 * What one client may reach and hold: `GET /metrics` counts every client's events and
 * notifications, so it is the operator's, not an API client's (one client would learn of
 * another's subscriptions and traffic); and the per-client subscription quota holds however many
 * creates arrive at once.
 */

let t: TestBroker | undefined;
afterEach(async () => {
  await t?.broker.close(0);
  t = undefined;
});

const metrics = (broker: TestBroker, token: string) =>
  broker.broker.app.request('/metrics', { headers: { authorization: `Bearer ${token}` } });

describe('GET /metrics', () => {
  it('takes the ingest token and refuses API keys', async () => {
    t = await inProcessBroker();
    expect((await metrics(t, TOKENS.alice)).status).toBe(401);
    const res = await metrics(t, TOKENS.ingest);
    expect(res.status).toBe(200);
    expect(await res.text()).toContain('broker_subscriptions');
  });

  it('takes BROKER_METRICS_TOKEN instead when it is set', async () => {
    const token = 'metrics-token-0123456789abcdef';
    t = await inProcessBroker({ BROKER_METRICS_TOKEN: token });
    expect((await metrics(t, token)).status).toBe(200);
    expect((await metrics(t, TOKENS.ingest)).status).toBe(401);
    expect((await metrics(t, TOKENS.alice)).status).toBe(401);
  });
});

describe('the per-client quota', () => {
  it('holds under concurrent creates', async () => {
    t = await inProcessBroker({ BROKER_MAX_SUBSCRIPTIONS_PER_CLIENT: '5' });
    const body = {
      resourceType: 'Subscription',
      reason: 'test',
      criteria: 'Patient',
      status: 'off',
      channel: { type: 'rest-hook', endpoint: 'http://127.0.0.1:9/quota' },
    };
    const broker = t;
    const answers = await Promise.all(
      Array.from({ length: 30 }, () => broker.call('POST', '/fhir/Subscription', body)),
    );
    const statuses = answers.map((a) => a.status).sort();
    expect(statuses.filter((s) => s === 201)).toHaveLength(5);
    expect(statuses.filter((s) => s === 422)).toHaveLength(25);
    expect((await t.call('GET', '/fhir/Subscription?_summary=count')).body.total).toBe(5);
  });
});

describe('GET /', () => {
  it('redirects to the live page without a token: relative, or under BROKER_PUBLIC_URL when set', async () => {
    t = await inProcessBroker({ BROKER_PUBLIC_URL: '' });
    const plain = await t.broker.app.request('/');
    expect([plain.status, plain.headers.get('location')]).toEqual([302, './live']);
    await t.broker.close(0);
    t = await inProcessBroker({ BROKER_PUBLIC_URL: 'https://broker.example.org/fhir-broker' });
    const prefixed = await t.broker.app.request('/');
    expect([prefixed.status, prefixed.headers.get('location')]).toEqual([
      302,
      'https://broker.example.org/fhir-broker/live',
    ]);
  });
});
