import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../test/support/temp-dirs.js';
import { ConfigError, loadConfig } from './config.js';
import { resolveCredentials } from './credentials.js';

const dataDir = () => tempDir('fsb-cred-');

/** The error `resolveCredentials` throws for `env`, checked to be a ConfigError. */
function credentialsError(env: Record<string, string>): string {
  const config = loadConfig(env);
  try {
    resolveCredentials(config);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error('resolveCredentials accepted it');
}

const KEPT = {
  apiClient: { clientId: 'local', token: 'fsb_kept-api-token-0123456789' },
  ingestToken: 'fsbi_kept-ingest-token-0123456789',
  wsTokenSecret: 'kept-ws-secret-0123456789abcdefghijklmnop',
};

describe('resolveCredentials', () => {
  it('generates credentials once and keeps them (0600) for the next start', () => {
    const dir = dataDir();
    const first = resolveCredentials(loadConfig({ BROKER_DATA_DIR: dir }));
    expect(first.local.apiClient?.clientId).toBe('local');
    expect(statSync(join(dir, 'credentials.json')).mode & 0o777).toBe(0o600);
    const again = resolveCredentials(loadConfig({ BROKER_DATA_DIR: dir }));
    expect(again).toEqual(first);
  });

  it('adds a binding-token key to a file kept by a version without one', () => {
    const dir = dataDir();
    const { wsTokenSecret: _, ...older } = KEPT;
    writeFileSync(join(dir, 'credentials.json'), JSON.stringify(older));
    const c = resolveCredentials(loadConfig({ BROKER_DATA_DIR: dir }));
    expect(c.apiClients).toEqual([older.apiClient]);
    expect(c.wsTokenSecret.length).toBeGreaterThanOrEqual(32);
    expect(JSON.parse(readFileSync(join(dir, 'credentials.json'), 'utf8'))).toEqual({
      ...older,
      wsTokenSecret: c.wsTokenSecret,
    });
  });

  it.each([
    ['truncated', JSON.stringify(KEPT).slice(0, 60), 'is not valid JSON'],
    ['empty', '', 'is not valid JSON'],
    ['{}', '{}', "is not a credentials file: its top level must have required property 'apiClient'"],
    [
      'a short ingest token',
      JSON.stringify({ ...KEPT, ingestToken: 'fsbi_short' }),
      'is not a credentials file: ingestToken must NOT have fewer than 16 characters',
    ],
    [
      // Hand-edited with a space: no Authorization header could carry it.
      'an ingest token with a space',
      JSON.stringify({ ...KEPT, ingestToken: `${KEPT.ingestToken} x` }),
      'is not a credentials file: ingestToken must be visible ASCII with no spaces (it comes in an Authorization header)',
    ],
    [
      'a token that is not a string',
      JSON.stringify({ ...KEPT, apiClient: { clientId: 'local', token: 12 } }),
      'is not a credentials file: apiClient.token must be string',
    ],
    [
      'the API key as the ingest token',
      JSON.stringify({ ...KEPT, ingestToken: KEPT.apiClient.token }),
      'holds the same token twice',
    ],
  ])('refuses a kept file that is %s, naming it and the fix, leaving it as it was', (_what, contents, problem) => {
    const dir = dataDir();
    const path = join(dir, 'credentials.json');
    writeFileSync(path, contents);
    const error = credentialsError({ BROKER_DATA_DIR: dir });
    expect(error).toBe(
      `BROKER_DATA_DIR: ${path} ${problem}: correct it, or delete it to have new credentials generated (clients then need the new API key and ingest token)`,
    );
    for (const secret of [KEPT.apiClient.token, KEPT.ingestToken, KEPT.wsTokenSecret, 'fsbi_short'])
      expect(error).not.toContain(secret.slice(0, 8));
    expect(readFileSync(path, 'utf8')).toBe(contents);
  });

  it('names BROKER_DATA_DIR when the directory cannot be made', () => {
    const file = join(dataDir(), 'a-file');
    writeFileSync(file, '');
    expect(credentialsError({ BROKER_DATA_DIR: join(file, 'x') })).toBe(
      `BROKER_DATA_DIR: cannot create the directory ${join(file, 'x')}: not a directory (ENOTDIR)`,
    );
  });

  it.each([
    [{ BROKER_INGEST_TOKEN: KEPT.apiClient.token }, 'BROKER_INGEST_TOKEN: is the same as the API key kept in {file}'],
    [{ BROKER_METRICS_TOKEN: KEPT.apiClient.token }, 'BROKER_METRICS_TOKEN: is the same as the API key kept in {file}'],
    [
      { BROKER_API_KEYS: `app:${KEPT.ingestToken}` },
      'BROKER_API_KEYS: the token of entry 1 of BROKER_API_KEYS is the same as the ingest token kept in {file}',
    ],
  ])('refuses an operator secret that is an API key, one of them kept: %j', (env, message) => {
    const dir = dataDir();
    const path = join(dir, 'credentials.json');
    writeFileSync(path, JSON.stringify(KEPT));
    const error = credentialsError({ BROKER_DATA_DIR: dir, ...env });
    expect(error).toBe(
      `${message.replace('{file}', path)}: an API client must not hold an operator secret; give each its own`,
    );
    expect(error).not.toContain(KEPT.apiClient.token);
    expect(error).not.toContain(KEPT.ingestToken);
  });
});
