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

export function signWebhook(secrets: readonly string[], id: string, timestampSeconds: number, body: string): string {
  return signWithKeys(secrets.map(secretKey), id, timestampSeconds, body);
}

/** The HMAC key of a `whsec_<base64>` secret (its decoded bytes). */
export function secretKey(secret: string): Buffer {
  return Buffer.from(
    secret.startsWith(WEBHOOK_SECRET_PREFIX) ? secret.slice(WEBHOOK_SECRET_PREFIX.length) : secret,
    'base64',
  );
}

/** `signWebhook` with keys already decoded (a sender keeps them per secret). */
export function signWithKeys(keys: readonly Buffer[], id: string, timestampSeconds: number, body: string): string {
  const signed = `${id}.${timestampSeconds}.${body}`;
  let out = '';
  for (const key of keys) {
    const mac = createHmac('sha256', key).update(signed).digest('base64');
    out += out === '' ? `v1,${mac}` : ` v1,${mac}`;
  }
  return out;
}
