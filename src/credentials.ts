import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ApiClient, Config } from './config.js';

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

const FILE = 'credentials.json';

export function resolveCredentials(config: Config): Credentials {
  if (config.apiClients.length > 0 && config.ingestToken !== undefined && config.wsTokenSecret !== undefined) {
    return {
      apiClients: config.apiClients,
      ingestToken: config.ingestToken,
      wsTokenSecret: config.wsTokenSecret,
      local: {},
    };
  }
  mkdirSync(config.dataDir, { recursive: true });
  const path = join(config.dataDir, FILE);
  const kept: KeptCredentials = existsSync(path)
    ? (JSON.parse(readFileSync(path, 'utf8')) as KeptCredentials)
    : {
        apiClient: { clientId: 'local', token: `fsb_${randomBytes(24).toString('base64url')}` },
        ingestToken: `fsbi_${randomBytes(24).toString('base64url')}`,
      };
  if (kept.wsTokenSecret === undefined || !existsSync(path)) {
    kept.wsTokenSecret ??= randomBytes(32).toString('base64url');
    writeFileSync(path, `${JSON.stringify(kept, null, 2)}\n`, { mode: 0o600 });
  }
  const useApi = config.apiClients.length === 0;
  const useIngest = config.ingestToken === undefined;
  return {
    apiClients: useApi ? [kept.apiClient] : config.apiClients,
    ingestToken: useIngest ? kept.ingestToken : (config.ingestToken as string),
    wsTokenSecret: config.wsTokenSecret ?? kept.wsTokenSecret,
    local: {
      ...(useApi ? { apiClient: kept.apiClient } : {}),
      ...(useIngest ? { ingestToken: kept.ingestToken } : {}),
    },
  };
}
