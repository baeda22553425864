import { describe, expect, it } from 'vitest';
import { tempDir } from '../test/support/temp-dirs.js';
import { ConfigError, loadConfig, sqsQueueRegion } from './config.js';

/** The error `loadConfig(env)` throws, checked to be a ConfigError. */
function configError(env: Record<string, string>): string {
  try {
    loadConfig(env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error('loadConfig accepted it');
}

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
      wsMaxPerClient: 5_000,
      wsMaxUnboundPerAddress: 64,
      maxInFlight: 512,
      maxInFlightPerOrigin: 32,
      maxInFlightPerClient: 128,
      eventRetentionMs: 7 * 86_400_000,
      handshakeRetryDelaysMs: [1000, 5000, 30_000, 60_000],
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
    // No Authorization header carries these: a broker that started would refuse every client.
    [
      'BROKER_INGEST_TOKEN',
      { BROKER_INGEST_TOKEN: 'ingest-token-0123\n456789' },
      /^BROKER_INGEST_TOKEN: must be visible ASCII with no spaces \(it comes in an Authorization header\)$/,
    ],
    [
      'BROKER_METRICS_TOKEN',
      { BROKER_METRICS_TOKEN: 'metrics token 0123456789' },
      /^BROKER_METRICS_TOKEN: must be visible ASCII/,
    ],
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
    [
      'BROKER_HANDSHAKE_RETRY_DELAYS',
      { BROKER_HANDSHAKE_RETRY_DELAYS: 'never' },
      /^BROKER_HANDSHAKE_RETRY_DELAYS: "never" is not a duration like .*, or none$/,
    ],
    [
      'BROKER_HANDSHAKE_RETRY_DELAYS',
      { BROKER_HANDSHAKE_RETRY_DELAYS: '30m,31m' },
      /^BROKER_HANDSHAKE_RETRY_DELAYS: must add up to at most 1h$/,
    ],
    [
      'BROKER_API_KEYS',
      { BROKER_API_KEYS: 'a:aaaaaaaaaaaaaaaa,b:aaaaaaaaaaaaaaaa' },
      /^BROKER_API_KEYS: entries 1 and 2 share a token$/,
    ],
    ['BROKER_PUBLIC_URL', { BROKER_PUBLIC_URL: 'ftp://x' }, /^BROKER_PUBLIC_URL: ftp:\/\/x is not an http\(s\) URL/],
    [
      'BROKER_CORS_ORIGINS',
      { BROKER_CORS_ORIGINS: 'https://app.example.org, https://app.example.org/' },
      /^BROKER_CORS_ORIGINS: https:\/\/app\.example\.org\/ is not an origin \(scheme:\/\/host\[:port\], no path or trailing slash\)$/,
    ],
    [
      'BROKER_CORS_ORIGINS',
      { BROKER_CORS_ORIGINS: 'app.example.org' },
      /^BROKER_CORS_ORIGINS: app\.example\.org is not an origin/,
    ],
    [
      'BROKER_CORS_ORIGINS',
      { BROKER_CORS_ORIGINS: '*, https://a.example' },
      /^BROKER_CORS_ORIGINS: \* allows every origin: give it alone$/,
    ],
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: 'hooks.example.org, 10.0.0.0/33' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry 10\.0\.0\.0\/33: bad prefix$/,
    ],
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: 'foo/8' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry foo\/8: a CIDR needs an IP address$/,
    ],
    // Entries that would be taken and never match: a port, a scheme, a wildcard.
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1:9000' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry 127\.0\.0\.1:9000: no port \(any port of a host is allowed\); entries are host names/,
    ],
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: '[::1]:9000' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry \[::1\]:9000: no port/,
    ],
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: 'http://127.0.0.1' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry http:\/\/127\.0\.0\.1: no scheme; entries are host names/,
    ],
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: 'localhost, *.example.com' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry \*\.example\.com: no wildcards; entries are host names/,
    ],
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: '0x7f.1' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry 0x7f\.1: write an IPv4 address as four decimal numbers; entries are host names/,
    ],
    [
      'BROKER_ENDPOINT_ALLOWLIST',
      { BROKER_ENDPOINT_ALLOWLIST: 'bücher.example' },
      /^BROKER_ENDPOINT_ALLOWLIST: entry bücher\.example: not a host name \(letters, digits, - and _; an internationalised name in its xn-- form\)/,
    ],
    [
      'BROKER_TOPICS_DIR',
      { BROKER_TOPICS_DIR: '/nonexistent' },
      /^BROKER_TOPICS_DIR: cannot read the directory \/nonexistent: no such file or directory \(ENOENT\)$/,
    ],
    [
      'BROKER_TOPICS_DIR',
      { BROKER_TOPICS_DIR: 'package.json' },
      /^BROKER_TOPICS_DIR: cannot read the directory \/.*\/package\.json: not a directory \(ENOTDIR\)$/,
    ],
    [
      'BROKER_WEBHOOK_THREADS',
      { BROKER_WEBHOOK_THREADS: '4', BROKER_MAX_IN_FLIGHT_PER_ORIGIN: '2' },
      /^BROKER_WEBHOOK_THREADS: must not exceed BROKER_MAX_IN_FLIGHT_PER_ORIGIN \(2\)/,
    ],
  ])('refuses a bad %s, naming it', (_name, env, message) => {
    expect(() => loadConfig(env)).toThrow(ConfigError);
    expect(() => loadConfig(env)).toThrow(message);
  });

  it.each([
    // Written token:clientId: the token stands where the clientId belongs.
    ['fsb_Zk3qL9xVt2Wm8RbN4cYp:local', /^BROKER_API_KEYS: entry 1 has a token \(after its first colon\) shorter/],
    ['app:aaaaaaaaaaaaaaaa,fsb_Zk3qL9xVt2Wm8RbN4cYp', /^BROKER_API_KEYS: entry 2 is not clientId:token/],
    ['app:aaaaaaaaaaaaaaaa,fsb Zk3qL9xVt2Wm8RbN4cYp:local', /^BROKER_API_KEYS: entry 2 is not clientId:token/],
    ['app:tiny-secret', /^BROKER_API_KEYS: entry 1 has a token \(after its first colon\) shorter/],
    ['app:token-with-\u00e9-0123456789', /^BROKER_API_KEYS: entry 1 has a token with a space or a character that/],
    ['app:token\twith\ttabs\t0123456789', /^BROKER_API_KEYS: entry 1 has a token with a space or a character that/],
    ['fsb_Zk3qL9xVt2Wm8RbN4cYp:a,fsb_Zk3qL9xVt2Wm8RbN4cYp:b', /^BROKER_API_KEYS: entry 1 has a token/],
    [
      'fsb_Zk3qL9xVt2Wm8:aaaaaaaaaaaaaaaa,fsb_Zk3qL9xVt2Wm8:bbbbbbbbbbbbbbbb',
      /^BROKER_API_KEYS: entries 1 and 2 have the same clientId$/,
    ],
  ])('names a bad API key entry by its position, never by any part of it: %s', (keys, message) => {
    const error = configError({ BROKER_API_KEYS: keys });
    expect(error).toMatch(message);
    for (const part of keys.split(/[,: ]/)) if (part.length >= 3) expect(error).not.toContain(part);
  });

  it.each(['BROKER_INGEST_TOKEN', 'BROKER_METRICS_TOKEN', 'BROKER_WS_TOKEN_SECRET'])(
    'refuses an API key that is also %s, naming both and neither token',
    (variable) => {
      const shared = 'shared-secret-0123456789abcdefghijklmnop';
      const error = configError({ BROKER_API_KEYS: `a:aaaaaaaaaaaaaaaa,b:${shared}`, [variable]: shared });
      expect(error).toBe(
        `${variable}: is the same as the token of entry 2 of BROKER_API_KEYS: an API client must not hold an operator secret; give each its own`,
      );
      expect(error).not.toContain(shared);
    },
  );

  it('lets the metrics token be the ingest token, as it is by default', () => {
    const token = 'operator-token-0123456789';
    const c = loadConfig({ BROKER_INGEST_TOKEN: token, BROKER_METRICS_TOKEN: token });
    expect([c.ingestToken, c.metricsToken]).toEqual([token, token]);
  });

  it('reads a handshake retry schedule, none for a single attempt', () => {
    expect(loadConfig({ BROKER_HANDSHAKE_RETRY_DELAYS: '500ms, 2s' }).handshakeRetryDelaysMs).toEqual([500, 2000]);
    expect(loadConfig({ BROKER_HANDSHAKE_RETRY_DELAYS: 'none' }).handshakeRetryDelaysMs).toEqual([]);
    expect(loadConfig({ BROKER_HANDSHAKE_RETRY_DELAYS: '30m,30m' }).handshakeRetryDelaysMs).toEqual([
      1_800_000, 1_800_000,
    ]);
  });

  it('reads CORS origins: none by default, a list, or * alone', () => {
    expect(loadConfig({}).corsOrigins).toEqual([]);
    expect(loadConfig({ BROKER_CORS_ORIGINS: 'https://app.example.org, http://localhost:5173' }).corsOrigins).toEqual([
      'https://app.example.org',
      'http://localhost:5173',
    ]);
    expect(loadConfig({ BROKER_CORS_ORIGINS: '*' }).corsOrigins).toEqual(['*']);
  });

  it('reads a valid allow-list', () => {
    const entries = ['hooks.example.org', '10.0.0.0/8', '[::1]', 'fd00::/8', 'localhost', 'svc_a.internal.'];
    expect(loadConfig({ BROKER_ENDPOINT_ALLOWLIST: entries.join(', ') }).endpointAllowlist).toEqual(entries);
  });

  it('reads a topics directory other than the default', () => {
    const dir = tempDir('fsb-topics-');
    expect(loadConfig({ BROKER_TOPICS_DIR: dir }).topicsDir).toBe(dir);
  });

  it.each([
    ['https://broker.example.org', 'https://broker.example.org', 'wss://broker.example.org/ws'],
    ['https://broker.example.org/', 'https://broker.example.org', 'wss://broker.example.org/ws'],
    ['http://broker.test//', 'http://broker.test', 'ws://broker.test/ws'],
    [
      'https://broker.example.org:8443/base/',
      'https://broker.example.org:8443/base',
      'wss://broker.example.org:8443/base/ws',
    ],
    ['http://[::1]:8080', 'http://[::1]:8080', 'ws://[::1]:8080/ws'],
    ['HTTPS://Broker.Example.ORG:443/Base', 'https://broker.example.org/Base', 'wss://broker.example.org/Base/ws'],
  ])('takes BROKER_PUBLIC_URL %s as %s', (raw, publicUrl, websocketUrl) => {
    expect(loadConfig({ BROKER_PUBLIC_URL: raw })).toMatchObject({ publicUrl, publicUrlExplicit: true, websocketUrl });
  });

  it.each([
    ['https://broker.example.org:99999/fhir base', /contains white space$/],
    ['https://broker.example.org:99999/fhir', /is not a valid URL/],
    ['https://broker.example.org/fhir base', /contains white space$/],
    ['https://broker.example.org:0', /must not have port 0$/],
    ['https://bro ker.example.org', /contains white space$/],
    ['https://broker..example.org:x/', /is not a valid URL/],
    [
      'https://ops:hunter2secret@broker.example.org',
      /^BROKER_PUBLIC_URL: the URL must not contain a user name or password$/,
    ],
    ['https://broker.example.org/fhir?x=1', /must not have a query or fragment$/],
    ['https://broker.example.org/#top', /must not have a query or fragment$/],
    ['https:///broker.example.org', /is not an http\(s\) URL/],
    ['broker.example.org', /is not an http\(s\) URL/],
  ])('refuses BROKER_PUBLIC_URL %s', (raw, message) => {
    const error = configError({ BROKER_PUBLIC_URL: raw });
    expect(error).toMatch(/^BROKER_PUBLIC_URL: /);
    expect(error).toMatch(message);
    expect(error).not.toContain('hunter2');
  });

  it('reads the per-address cap on unbound WebSockets, 0 turning it off', () => {
    expect(loadConfig({ BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '3' }).wsMaxUnboundPerAddress).toBe(3);
    // A quarter of the socket cap unless set; 0: no cap.
    expect(loadConfig({ BROKER_WS_MAX_CONNECTIONS: '100' }).wsMaxPerClient).toBe(25);
    expect(loadConfig({ BROKER_WS_MAX_PER_CLIENT: '0' }).wsMaxPerClient).toBe(0);
    expect(loadConfig({ BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '0' }).wsMaxUnboundPerAddress).toBe(0);
  });

  it('reads an SQS queue URL and endpoint, off by default, and refuses what is no queue URL', () => {
    const url = 'https://sqs.eu-west-1.amazonaws.com/111122223333/fhir-events';
    const c = loadConfig({ BROKER_SQS_QUEUE_URL: url, SQS_ENDPOINT: 'http://127.0.0.1:9324' });
    expect([c.sqsQueueUrl, c.sqsEndpoint]).toEqual([url, 'http://127.0.0.1:9324']);
    expect(loadConfig({}).sqsQueueUrl).toBeUndefined();
    expect([loadConfig({}).sqsPollers, loadConfig({ BROKER_SQS_POLLERS: '4' }).sqsPollers]).toEqual([2, 4]);
    expect(() => loadConfig({ BROKER_SQS_POLLERS: '0' })).toThrow(/BROKER_SQS_POLLERS/);
    // Another host only with SQS_ENDPOINT (a local stand-in): no signed request to a host that is neither.
    const local = 'http://127.0.0.1:9324/000000000000/fhir-events';
    expect(loadConfig({ BROKER_SQS_QUEUE_URL: local, SQS_ENDPOINT: 'http://127.0.0.1:9324' }).sqsQueueUrl).toBe(local);
    for (const bad of [
      'fhir-events',
      'arn:aws:sqs:eu-west-1:111122223333:fhir-events',
      'https://sqs.example/',
      'https://evil.example.com/111122223333/fhir-events',
      local,
    ]) {
      expect(() => loadConfig({ BROKER_SQS_QUEUE_URL: bad })).toThrow(
        'BROKER_SQS_QUEUE_URL: must be an Amazon SQS queue URL, such as https://sqs.us-east-1.amazonaws.com/111122223333/fhir-events (another host only with SQS_ENDPOINT)',
      );
    }
  });

  it('reads the dead-letter queue URL of the Lambda events function, off by default, by the same rule', () => {
    const url = 'https://sqs.eu-west-1.amazonaws.com/111122223333/broker-dead-letters';
    expect(loadConfig({ BROKER_DEAD_LETTER_QUEUE_URL: url }).deadLetterQueueUrl).toBe(url);
    expect(loadConfig({}).deadLetterQueueUrl).toBeUndefined();
    const local = 'http://127.0.0.1:9324/000000000000/dead-letters';
    expect(
      loadConfig({ BROKER_DEAD_LETTER_QUEUE_URL: local, SQS_ENDPOINT: 'http://127.0.0.1:9324' }).deadLetterQueueUrl,
    ).toBe(local);
    expect(() => loadConfig({ BROKER_DEAD_LETTER_QUEUE_URL: local })).toThrow(
      'BROKER_DEAD_LETTER_QUEUE_URL: must be an Amazon SQS queue URL, such as https://sqs.us-east-1.amazonaws.com/111122223333/fhir-events (another host only with SQS_ENDPOINT)',
    );
  });

  it.each([
    ['https://sqs.eu-west-1.amazonaws.com/1/q', 'eu-west-1'],
    ['https://sqs-fips.us-east-2.amazonaws.com/1/q', 'us-east-2'],
    ['https://sqs.cn-north-1.amazonaws.com.cn/1/q', 'cn-north-1'],
    ['https://sqs.us-gov-west-1.amazonaws.com/1/q', 'us-gov-west-1'],
    ['https://sqs.eu-west-1.api.aws/1/q', 'eu-west-1'],
    ['https://vpce-0abc-xyz.sqs.eu-west-1.vpce.amazonaws.com/1/q', 'eu-west-1'],
    ['https://us-west-2.queue.amazonaws.com/1/q', 'us-west-2'],
    ['https://queue.amazonaws.com/1/q', 'us-east-1'],
    ['https://evil.example.com/1/q', undefined],
    ['http://sqs.eu-west-1.amazonaws.com/1/q', undefined],
  ])('finds the region of the SQS queue %s: %s', (url, region) => {
    expect(sqsQueueRegion(url)).toBe(region);
  });

  it('accepts as many sender threads as connections per origin', () => {
    const c = loadConfig({ BROKER_WEBHOOK_THREADS: '2', BROKER_MAX_IN_FLIGHT_PER_ORIGIN: '2' });
    expect([c.webhookThreads, c.maxInFlightPerOrigin]).toEqual([2, 2]);
    expect(loadConfig({ BROKER_MAX_IN_FLIGHT_PER_CLIENT: '16' }).maxInFlightPerClient).toBe(16);
    expect(() => loadConfig({ BROKER_MAX_IN_FLIGHT_PER_CLIENT: '0' })).toThrow(/BROKER_MAX_IN_FLIGHT_PER_CLIENT/);
  });
});

describe('loadConfig: BROKER_FHIR_READ (the content stage)', () => {
  const local = 'http://127.0.0.1:8080/fhir';

  it('leaves fhirRead out when BROKER_FHIR_READ is unset or blank', () => {
    expect(loadConfig({}).fhirRead).toBeUndefined();
    expect(loadConfig({ BROKER_FHIR_READ: '  ' }).fhirRead).toBeUndefined();
  });

  it.each(['BROKER_FHIR_READ_AUTH', 'BROKER_FHIR_READ_TOKEN'])('refuses %s without BROKER_FHIR_READ', (variable) => {
    expect(configError({ [variable]: variable.endsWith('AUTH') ? 'bearer' : 'fhir-read-token-0123' })).toBe(
      `${variable}: is set but BROKER_FHIR_READ is not`,
    );
  });

  it('reads healthlake as SigV4 in AWS_REGION, each event naming its datastore', () => {
    expect(loadConfig({ BROKER_FHIR_READ: 'healthlake' }).fhirRead).toEqual({
      auth: 'sigv4',
      region: 'us-east-1',
      timeoutMs: 10_000,
    });
    const c = loadConfig({ BROKER_FHIR_READ: 'healthlake', AWS_REGION: 'eu-central-1' });
    expect(c.fhirRead).toEqual({ auth: 'sigv4', region: 'eu-central-1', timeoutMs: 10_000 });
    expect(Object.isFrozen(c.fhirRead)).toBe(true);
    expect(loadConfig({ BROKER_FHIR_READ: 'healthlake', BROKER_FHIR_READ_AUTH: 'sigv4' }).fhirRead?.auth).toBe('sigv4');
  });

  it('reads a HealthLake datastore URL as SigV4 in the region of its host, without the trailing slash', () => {
    const c = loadConfig({
      BROKER_FHIR_READ: 'https://healthlake.eu-west-2.amazonaws.com/datastore/x/r4/',
      AWS_REGION: 'us-west-2',
    });
    expect(c.fhirRead).toEqual({
      baseUrl: 'https://healthlake.eu-west-2.amazonaws.com/datastore/x/r4',
      auth: 'sigv4',
      region: 'eu-west-2',
      timeoutMs: 10_000,
    });
  });

  it('reads another FHIR base URL without auth, or with a bearer token when one is given', () => {
    expect(loadConfig({ BROKER_FHIR_READ: local }).fhirRead).toEqual({
      baseUrl: local,
      auth: 'none',
      region: 'us-east-1',
      timeoutMs: 10_000,
    });
    const token = 'fhir-read-token-0123456789';
    expect(loadConfig({ BROKER_FHIR_READ: `${local}//`, BROKER_FHIR_READ_TOKEN: token }).fhirRead).toEqual({
      baseUrl: local,
      auth: 'bearer',
      token,
      region: 'us-east-1',
      timeoutMs: 10_000,
    });
    expect(
      loadConfig({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_AUTH: 'bearer', BROKER_FHIR_READ_TOKEN: token }).fhirRead
        ?.auth,
    ).toBe('bearer');
    // SigV4 on a URL of another host: asked for, it is taken.
    expect(
      loadConfig({ BROKER_FHIR_READ: 'https://fhir.example.org/r4', BROKER_FHIR_READ_AUTH: 'sigv4' }).fhirRead,
    ).toMatchObject({ baseUrl: 'https://fhir.example.org/r4', auth: 'sigv4', region: 'us-east-1' });
  });

  it.each([
    [
      'bearer without a token',
      { BROKER_FHIR_READ: local, BROKER_FHIR_READ_AUTH: 'bearer' },
      'BROKER_FHIR_READ_TOKEN: is required with bearer',
    ],
    [
      'a token with none',
      { BROKER_FHIR_READ: local, BROKER_FHIR_READ_AUTH: 'none', BROKER_FHIR_READ_TOKEN: 'fhir-read-token-0123' },
      'BROKER_FHIR_READ_TOKEN: is set but BROKER_FHIR_READ_AUTH is none',
    ],
    [
      'a token with a HealthLake URL (sigv4)',
      {
        BROKER_FHIR_READ: 'https://healthlake.eu-west-2.amazonaws.com/datastore/x/r4',
        BROKER_FHIR_READ_TOKEN: 'fhir-read-token-0123',
      },
      'BROKER_FHIR_READ_TOKEN: is set but BROKER_FHIR_READ_AUTH is sigv4',
    ],
    [
      'healthlake with bearer',
      {
        BROKER_FHIR_READ: 'healthlake',
        BROKER_FHIR_READ_AUTH: 'bearer',
        BROKER_FHIR_READ_TOKEN: 'fhir-read-token-0123',
      },
      'BROKER_FHIR_READ_AUTH: HealthLake (BROKER_FHIR_READ=healthlake) is read with sigv4',
    ],
    [
      'healthlake with none',
      { BROKER_FHIR_READ: 'healthlake', BROKER_FHIR_READ_AUTH: 'none' },
      'BROKER_FHIR_READ_AUTH: HealthLake (BROKER_FHIR_READ=healthlake) is read with sigv4',
    ],
    [
      'an unknown auth',
      { BROKER_FHIR_READ: local, BROKER_FHIR_READ_AUTH: 'basic' },
      'BROKER_FHIR_READ_AUTH: must be sigv4, bearer or none',
    ],
  ])('refuses %s', (_case, env, message) => {
    expect(configError(env)).toBe(message);
  });

  it.each([
    ['ftp://fhir.example.org/r4', /^BROKER_FHIR_READ: must be healthlake or an http\(s\) FHIR base URL/],
    ['not a url', /^BROKER_FHIR_READ: must be healthlake or an http\(s\) FHIR base URL$/],
    ['HealthLake', /^BROKER_FHIR_READ: must be healthlake or an http\(s\) FHIR base URL$/],
    ['fhir.example.org/r4', /^BROKER_FHIR_READ: must be healthlake or an http\(s\) FHIR base URL$/],
    ['https://fhir.example.org/r4?x=1', /^BROKER_FHIR_READ: .* without query or fragment$/],
    ['https://fhir.example.org/r4#top', /^BROKER_FHIR_READ: .* without query or fragment$/],
    [
      'https://reader:hunter2secret@fhir.example.org/r4',
      /^BROKER_FHIR_READ: must not carry credentials; use BROKER_FHIR_READ_TOKEN$/,
    ],
    ['https://reader@fhir.example.org/r4', /^BROKER_FHIR_READ: must not carry credentials/],
  ])('refuses BROKER_FHIR_READ %s, naming it', (raw, message) => {
    const error = configError({ BROKER_FHIR_READ: raw });
    expect(error).toMatch(message);
    expect(error).not.toContain('hunter2');
  });

  it.each([
    ['a space', 'fhir read token 0123456789'],
    ['a tab', 'fhir-read-token\t0123456789'],
    ['a character outside visible ASCII', 'fhir-read-token-\u00e9-0123456789'],
  ])('refuses a BROKER_FHIR_READ_TOKEN with %s, without repeating it', (_case, token) => {
    const error = configError({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_TOKEN: token });
    expect(error).toBe(
      'BROKER_FHIR_READ_TOKEN: must be visible ASCII with no spaces (it goes in an Authorization header)',
    );
    expect(error).not.toContain('0123456789');
  });

  it('reads BROKER_FHIR_READ_TIMEOUT as one duration of at least 100 ms', () => {
    expect(loadConfig({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_TIMEOUT: '2s' }).fhirRead?.timeoutMs).toBe(2000);
    expect(loadConfig({ BROKER_FHIR_READ: 'healthlake', BROKER_FHIR_READ_TIMEOUT: '250ms' }).fhirRead?.timeoutMs).toBe(
      250,
    );
    expect(loadConfig({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_TIMEOUT: '25s' }).fhirRead?.timeoutMs).toBe(25_000);
    // An ingest request waits for the read: no more than API Gateway would give a Lambda.
    expect(configError({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_TIMEOUT: '1m' })).toBe(
      'BROKER_FHIR_READ_TIMEOUT: must be at most 25s: an ingest request waits for the read',
    );
    expect(configError({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_TIMEOUT: 'soon' })).toMatch(
      /^BROKER_FHIR_READ_TIMEOUT: "soon" is not a duration like /,
    );
    expect(configError({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_TIMEOUT: '50ms' })).toBe(
      'BROKER_FHIR_READ_TIMEOUT: must be one duration of at least 100 ms',
    );
    expect(configError({ BROKER_FHIR_READ: local, BROKER_FHIR_READ_TIMEOUT: '1s,2s' })).toBe(
      'BROKER_FHIR_READ_TIMEOUT: must be one duration of at least 100 ms',
    );
  });
});

describe('BROKER_FHIR_READ as a URL, canonical', () => {
  it('keeps the URL in its canonical form (scheme and host lower-cased, default port dropped, no trailing slash)', () => {
    const config = loadConfig({ BROKER_FHIR_READ: 'HTTPS://FHIR.Example.ORG:443/R4/' }).fhirRead;
    expect(config?.baseUrl).toBe('https://fhir.example.org/R4');
  });

  it('refuses a bearer token over plain http however the scheme is written', () => {
    expect(() => loadConfig({ BROKER_FHIR_READ: 'HTTP://fhir.example.org/r4', BROKER_FHIR_READ_TOKEN: 'abc' })).toThrow(
      /^BROKER_FHIR_READ: must be https with a bearer token/,
    );
    expect(
      loadConfig({ BROKER_FHIR_READ: 'HTTP://127.0.0.1:8080/fhir', BROKER_FHIR_READ_TOKEN: 'abc' }).fhirRead?.auth,
    ).toBe('bearer');
  });
});

describe('loadConfig: BROKER_RECONCILE_EVERY and BROKER_RECONCILE_LAG (the reconciler)', () => {
  const base = 'https://fhir.example.org/r4';

  it('leaves reconciliation off when BROKER_RECONCILE_EVERY is unset', () => {
    expect(loadConfig({ BROKER_FHIR_READ: base }).reconcile).toBeUndefined();
  });

  it('reads the interval, and a lag of 15 minutes unless set', () => {
    expect(loadConfig({ BROKER_FHIR_READ: base, BROKER_RECONCILE_EVERY: '5m' }).reconcile).toEqual({
      everyMs: 300_000,
      lagMs: 900_000,
    });
    expect(
      loadConfig({ BROKER_FHIR_READ: base, BROKER_RECONCILE_EVERY: '30s', BROKER_RECONCILE_LAG: '0s' }).reconcile,
    ).toEqual({ everyMs: 30_000, lagMs: 0 });
  });

  it('needs BROKER_FHIR_READ as a base URL: it says whose changes to read', () => {
    for (const env of [{}, { BROKER_FHIR_READ: 'healthlake' }]) {
      expect(() => loadConfig({ ...env, BROKER_RECONCILE_EVERY: '5m' })).toThrow(
        /^BROKER_RECONCILE_EVERY: needs BROKER_FHIR_READ set to the FHIR base URL/,
      );
    }
  });

  it('refuses a lag without an interval, and bad or out-of-range durations', () => {
    expect(() => loadConfig({ BROKER_FHIR_READ: base, BROKER_RECONCILE_LAG: '1m' })).toThrow(
      'BROKER_RECONCILE_LAG: is set but BROKER_RECONCILE_EVERY is not',
    );
    for (const [variable, value] of [
      ['BROKER_RECONCILE_EVERY', '500ms'],
      ['BROKER_RECONCILE_EVERY', 'often'],
      ['BROKER_RECONCILE_EVERY', '2d'],
      ['BROKER_RECONCILE_EVERY', '1m,2m'],
      ['BROKER_RECONCILE_LAG', '2d'],
      ['BROKER_RECONCILE_LAG', '-1m'],
    ] as const) {
      expect(() => loadConfig({ BROKER_FHIR_READ: base, BROKER_RECONCILE_EVERY: '5m', [variable]: value })).toThrow(
        new RegExp(`^${variable}: `),
      );
    }
  });
});

describe('loadConfig: BROKER_EVENT_RETENTION beside the reconciler', () => {
  it('refuses a retention shorter than the reconciler needs to tell what was notified', () => {
    const env = { BROKER_FHIR_READ: 'https://fhir.example.org/r4', BROKER_RECONCILE_EVERY: '5m' };
    // The lag (15m), a window of an hour, a minute of slack: 76 minutes and a bit.
    expect(() => loadConfig({ ...env, BROKER_EVENT_RETENTION: '1h' })).toThrow(
      /^BROKER_EVENT_RETENTION: must be at least 77m with BROKER_RECONCILE_EVERY/,
    );
    expect(loadConfig({ ...env, BROKER_EVENT_RETENTION: '77m' }).eventRetentionMs).toBe(77 * 60_000);
    expect(() => loadConfig({ ...env, BROKER_RECONCILE_EVERY: '1d', BROKER_EVENT_RETENTION: '1d' })).toThrow(
      /^BROKER_EVENT_RETENTION: must be at least/,
    );
  });
});
