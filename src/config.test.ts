import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from './config.js';

describe('loadConfig', () => {
  it('gives the documented defaults for an empty environment', () => {
    const c = loadConfig({});
    expect(c).toMatchObject({
      port: 8080,
      host: '127.0.0.1',
      publicUrl: 'http://127.0.0.1:8080',
      websocketUrl: 'ws://127.0.0.1:8080/ws',
      dataDir: './data',
      store: 'sqlite',
      webhookThreads: 1,
      wsMaxConnections: 20_000,
      wsMaxUnboundPerAddress: 64,
      maxInFlight: 512,
      maxInFlightPerOrigin: 32,
      maxInFlightPerClient: 128,
      eventRetentionMs: 7 * 86_400_000,
      awsRegion: 'us-east-1',
      logLevel: 'info',
    });
    expect(c.apiClients).toEqual([]);
    expect(Object.isFrozen(c)).toBe(true);
  });

  it('reads API keys and brackets an IPv6 host in the public URL', () => {
    const c = loadConfig({ BROKER_API_KEYS: 'app-a:aaaaaaaaaaaaaaaa, app-b:bbbbbbbbbbbbbbbb', HOST: '::1', PORT: '0' });
    expect(c.apiClients).toEqual([
      { clientId: 'app-a', token: 'aaaaaaaaaaaaaaaa' },
      { clientId: 'app-b', token: 'bbbbbbbbbbbbbbbb' },
    ]);
    expect(c.publicUrl).toBe('http://[::1]:0');
  });

  it.each([
    ['PORT', { PORT: '70000' }, /^PORT: must be an integer from 0 to 65535$/],
    ['PORT', { PORT: '8o8o' }, /^PORT: must be an integer/],
    ['BROKER_STORE', { BROKER_STORE: 'postgres' }, /^BROKER_STORE: must be sqlite or dynamodb, not postgres$/],
    ['BROKER_INGEST_TOKEN', { BROKER_INGEST_TOKEN: 'short' }, /at least 16 characters/],
    ['BROKER_METRICS_TOKEN', { BROKER_METRICS_TOKEN: 'short' }, /at least 16 characters/],
    ['BROKER_WS_MAX_CONNECTIONS', { BROKER_WS_MAX_CONNECTIONS: '0' }, /^BROKER_WS_MAX_CONNECTIONS: /],
    [
      'BROKER_WS_MAX_UNBOUND_PER_ADDRESS',
      { BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '1000001' },
      /^BROKER_WS_MAX_UNBOUND_PER_ADDRESS: must be an integer from 0 to 1000000$/,
    ],
    [
      'BROKER_WS_MAX_UNBOUND_PER_ADDRESS',
      { BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '-1' },
      /^BROKER_WS_MAX_UNBOUND_PER_ADDRESS: must be an integer/,
    ],
    ['AWS_REGION', { AWS_REGION: 'mars' }, /^AWS_REGION: mars is not an AWS region$/],
    ['BROKER_EVENT_RETENTION', { BROKER_EVENT_RETENTION: '10s' }, /at least 1m/],
    ['BROKER_RETRY_DELAYS', { BROKER_RETRY_DELAYS: '5s,soon' }, /^BROKER_RETRY_DELAYS: /],
    ['BROKER_API_KEYS', { BROKER_API_KEYS: 'a:aaaaaaaaaaaaaaaa,b:aaaaaaaaaaaaaaaa' }, /two clients share a token/],
    ['BROKER_PUBLIC_URL', { BROKER_PUBLIC_URL: 'ftp://x' }, /is not an http\(s\) URL/],
    [
      'BROKER_WEBHOOK_THREADS',
      { BROKER_WEBHOOK_THREADS: '4', BROKER_MAX_IN_FLIGHT_PER_ORIGIN: '2' },
      /^BROKER_WEBHOOK_THREADS: must not exceed BROKER_MAX_IN_FLIGHT_PER_ORIGIN \(2\)/,
    ],
  ])('refuses a bad %s, naming it', (_name, env, message) => {
    expect(() => loadConfig(env)).toThrow(ConfigError);
    expect(() => loadConfig(env)).toThrow(message);
  });

  it('never echoes an API token in its error', () => {
    let message = '';
    try {
      loadConfig({ BROKER_API_KEYS: 'app:tiny-secret' });
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toBe('BROKER_API_KEYS: the token of app must be at least 16 characters');
    expect(message).not.toContain('tiny-secret');
  });

  it('reads the per-address cap on unbound WebSockets, 0 turning it off', () => {
    expect(loadConfig({ BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '3' }).wsMaxUnboundPerAddress).toBe(3);
    expect(loadConfig({ BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '0' }).wsMaxUnboundPerAddress).toBe(0);
  });

  it('accepts as many sender threads as connections per origin', () => {
    const c = loadConfig({ BROKER_WEBHOOK_THREADS: '2', BROKER_MAX_IN_FLIGHT_PER_ORIGIN: '2' });
    expect([c.webhookThreads, c.maxInFlightPerOrigin]).toEqual([2, 2]);
    expect(loadConfig({ BROKER_MAX_IN_FLIGHT_PER_CLIENT: '16' }).maxInFlightPerClient).toBe(16);
    expect(() => loadConfig({ BROKER_MAX_IN_FLIGHT_PER_CLIENT: '0' })).toThrow(/BROKER_MAX_IN_FLIGHT_PER_CLIENT/);
  });
});
