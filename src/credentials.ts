import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Ajv } from 'ajv';
import {
  type ApiClient,
  CLIENT_ID,
  type Config,
  ConfigError,
  fsReason,
  MIN_TOKEN_CHARS,
  MIN_WS_SECRET_CHARS,
  refuseOperatorSecretsAsApiKeys,
  TOKEN_CHARS,
} from './config.js';
import { makeDataDir } from './data-dir-lock.js';

/**
 * Credentials for a laptop start with no configuration: when `BROKER_API_KEYS`,
 * `BROKER_INGEST_TOKEN` or `BROKER_WS_TOKEN_SECRET` is unset, one is generated once and kept
 * (mode 0600) in the data dir, so restarts keep working with the same tokens.
 */

export interface Credentials {
  readonly apiClients: readonly ApiClient[];
  readonly ingestToken: string;
  /** HMAC key of WebSocket binding tokens. */
  readonly wsTokenSecret: string;
  /** What was generated or loaded from the data dir (to print at start; never logged). */
  readonly local: { apiClient?: ApiClient; ingestToken?: string };
}

interface KeptCredentials {
  apiClient: ApiClient;
  ingestToken: string;
  wsTokenSecret?: string;
}

/** The file in the data dir that keeps generated credentials. */
export const CREDENTIALS_FILE = 'credentials.json';

// The rules of the variables the values stand in for (config.ts); other fields are left alone.
const keptSchema = {
  type: 'object',
  required: ['apiClient', 'ingestToken'],
  properties: {
    apiClient: {
      type: 'object',
      required: ['clientId', 'token'],
      properties: {
        clientId: { type: 'string', pattern: CLIENT_ID.source },
        token: { type: 'string', minLength: MIN_TOKEN_CHARS, pattern: TOKEN_CHARS.source },
      },
    },
    ingestToken: { type: 'string', minLength: MIN_TOKEN_CHARS, pattern: TOKEN_CHARS.source },
    wsTokenSecret: { type: 'string', minLength: MIN_WS_SECRET_CHARS },
  },
};
const validateKept = new Ajv({ strict: true }).compile<KeptCredentials>(keptSchema);

export function resolveCredentials(config: Config): Credentials {
  if (config.apiClients.length > 0 && config.ingestToken !== undefined && config.wsTokenSecret !== undefined) {
    return {
      apiClients: config.apiClients,
      ingestToken: config.ingestToken,
      wsTokenSecret: config.wsTokenSecret,
      local: {},
    };
  }
  makeDataDir(config.dataDir);
  const path = join(config.dataDir, CREDENTIALS_FILE);
  const existed = existsSync(path);
  const kept: KeptCredentials = existed
    ? readKept(path)
    : {
        apiClient: { clientId: 'local', token: `fsb_${randomBytes(24).toString('base64url')}` },
        ingestToken: `fsbi_${randomBytes(24).toString('base64url')}`,
      };
  const useApi = config.apiClients.length === 0;
  const useIngest = config.ingestToken === undefined;
  const apiClients = useApi ? [kept.apiClient] : config.apiClients;
  const ingestToken = useIngest ? kept.ingestToken : (config.ingestToken as string);
  // loadConfig has compared the variables with each other; here what is kept meets what is set.
  refuseOperatorSecretsAsApiKeys(apiClients, useApi ? `the API key kept in ${path}` : 'BROKER_API_KEYS', [
    { source: useIngest ? `the ingest token kept in ${path}` : 'BROKER_INGEST_TOKEN', value: ingestToken },
    { source: 'BROKER_METRICS_TOKEN', value: config.metricsToken },
    {
      source: config.wsTokenSecret === undefined ? `the binding-token key kept in ${path}` : 'BROKER_WS_TOKEN_SECRET',
      value: config.wsTokenSecret ?? kept.wsTokenSecret,
    },
  ]);
  if (kept.wsTokenSecret === undefined || !existed) {
    kept.wsTokenSecret ??= randomBytes(32).toString('base64url');
    try {
      writeFileSync(path, `${JSON.stringify(kept, null, 2)}\n`, { mode: 0o600 });
    } catch (err) {
      throw new ConfigError('BROKER_DATA_DIR', `cannot write ${path}: ${fsReason(err)}`);
    }
  }
  return {
    apiClients,
    ingestToken,
    wsTokenSecret: config.wsTokenSecret ?? kept.wsTokenSecret,
    local: {
      ...(useApi ? { apiClient: kept.apiClient } : {}),
      ...(useIngest ? { ingestToken: kept.ingestToken } : {}),
    },
  };
}

/**
 * The kept file, checked before anything uses or rewrites it. Errors name the file and the field,
 * never its contents (they are secrets; JSON.parse's own message quotes them).
 */
export function readKept(path: string): KeptCredentials {
  const fix =
    'correct it, or delete it to have new credentials generated (clients then need the new API key and ingest token)';
  const refuse = (what: string) => new ConfigError('BROKER_DATA_DIR', `${path} ${what}: ${fix}`);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw refuse(`cannot be read (${fsReason(err)})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw refuse('is not valid JSON');
  }
  if (!validateKept(json)) {
    const e = validateKept.errors?.[0];
    const field = e?.instancePath.slice(1).replaceAll('/', '.') || 'its top level';
    // A token's pattern in words (TOKEN_CHARS), not as Ajv quotes it.
    const token = e?.keyword === 'pattern' && /token$/i.test(field);
    const message = token ? 'must be visible ASCII with no spaces (it comes in an Authorization header)' : e?.message;
    throw refuse(`is not a credentials file: ${field} ${message ?? 'is invalid'}`);
  }
  const secrets = [json.apiClient.token, json.ingestToken, json.wsTokenSecret].filter((s) => s !== undefined);
  if (new Set(secrets).size !== secrets.length) throw refuse('holds the same token twice');
  return json;
}
