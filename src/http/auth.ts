import { createHash, timingSafeEqual } from 'node:crypto';
import { BrokerError } from '../core/errors.js';

/**
 * Bearer-token authentication. Tokens are compared as SHA-256 digests: a Map look-up on the
 * digest, then a constant-time comparison, so response time does not leak token prefixes.
 */

const digest = (s: string): Buffer => createHash('sha256').update(s).digest();

export function bearerToken(header: string | undefined): string | undefined {
  const m = header === undefined ? null : /^Bearer\s+(\S+)\s*$/i.exec(header);
  return m?.[1];
}

export class ApiKeyAuth {
  #clients = new Map<string, { clientId: string; digest: Buffer }>();

  constructor(clients: readonly { clientId: string; token: string }[]) {
    this.replace(clients);
  }

  /** From now on only these keys authenticate (a key revoked, another added). */
  replace(clients: readonly { clientId: string; token: string }[]): void {
    const next = new Map<string, { clientId: string; digest: Buffer }>();
    for (const c of clients) {
      const d = digest(c.token);
      next.set(d.toString('hex'), { clientId: c.clientId, digest: d });
    }
    this.#clients = next;
  }

  /** The client id for an `Authorization` header; throws UNAUTHORIZED. */
  authenticate(header: string | undefined): string {
    const token = bearerToken(header);
    if (token !== undefined) {
      const d = digest(token);
      const hit = this.#clients.get(d.toString('hex'));
      if (hit !== undefined && timingSafeEqual(hit.digest, d)) return hit.clientId;
    }
    throw new BrokerError(
      'UNAUTHORIZED',
      'Send Authorization: Bearer <API key> from BROKER_API_KEYS (unset: the one in credentials.json in the data directory)',
    );
  }
}

export class IngestAuth {
  #digest: Buffer;
  readonly #hint: string;

  /** `hint`: what the 401 tells the caller to send. */
  constructor(token: string, hint = 'Send Authorization: Bearer <ingest token> (BROKER_INGEST_TOKEN)') {
    this.#digest = digest(token);
    this.#hint = hint;
  }

  /** From now on only `token` authenticates (the operator rotated it). */
  replace(token: string): void {
    this.#digest = digest(token);
  }

  check(header: string | undefined): void {
    const token = bearerToken(header);
    if (token !== undefined && timingSafeEqual(digest(token), this.#digest)) return;
    throw new BrokerError('UNAUTHORIZED', this.#hint);
  }
}
