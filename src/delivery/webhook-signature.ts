import { createHmac, randomBytes } from 'node:crypto';
import { WEBHOOK_SECRET_PREFIX } from '../core/subscription.js';

/**
 * Standard Webhooks signatures: `v1,` + base64 HMAC-SHA256 over `{id}.{timestamp}.{body}` with the
 * bytes of a `whsec_<base64>` secret. Several secrets (during rotation) give space-separated signatures.
 */

export function generateWebhookSecret(): string {
  // 32 bytes: inside the spec's 24–64 byte range, a full SHA-256 block of entropy.
  return `${WEBHOOK_SECRET_PREFIX}${randomBytes(32).toString('base64')}`;
}

export function signWebhook(
  secrets: readonly string[],
  id: string,
  timestampSeconds: number,
  body: string | Buffer,
): string {
  return signWithKeys(secrets.map(secretKey), id, timestampSeconds, body);
}

/** The HMAC key of a `whsec_<base64>` secret (its decoded bytes). */
export function secretKey(secret: string): Buffer {
  return Buffer.from(
    secret.startsWith(WEBHOOK_SECRET_PREFIX) ? secret.slice(WEBHOOK_SECRET_PREFIX.length) : secret,
    'base64',
  );
}

/**
 * `signWebhook` with keys already decoded (a sender keeps them per secret). The body is fed as
 * it is (the UTF-8 bytes of a string), not joined to the prefix first: no 1–2 KB copy per request.
 */
export function signWithKeys(
  keys: readonly Buffer[],
  id: string,
  timestampSeconds: number,
  body: string | Buffer,
): string {
  const prefix = `${id}.${timestampSeconds}.`;
  let out = '';
  for (const key of keys) {
    const mac = createHmac('sha256', key).update(prefix).update(body).digest('base64');
    out += out === '' ? `v1,${mac}` : ` v1,${mac}`;
  }
  return out;
}
