import { afterEach, describe, expect, it } from 'vitest';
import { inProcessBroker, type TestBroker, TOKENS } from './support/in-process.js';

/**
 * `GET /metrics` counts every client's events and notifications: it is the operator's, not an API
 * client's (one client would learn of another's subscriptions and traffic).
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
