import { createHmac, randomBytes } from 'node:crypto';

/**
 * Standard Webhooks signatures: `v1,` + base64 HMAC-SHA256 over `{id}.{timestamp}.{body}` with the
 * bytes of a `whsec_<base64>` secret. Several secrets (during rotation) give space-separated signatures.
 */

const PREFIX = 'whsec_';

export function generateWebhookSecret(): string {
  // 32 bytes: inside the spec's 24–64 byte range, a full SHA-256 block of entropy.
  return `${PREFIX}${randomBytes(32).toString('base64')}`;
}

export function signWebhook(secrets: readonly string[], id: string, timestampSeconds: number, body: string): string {
  return secrets
    .map((secret) => {
      const key = Buffer.from(secret.startsWith(PREFIX) ? secret.slice(PREFIX.length) : secret, 'base64');
      const mac = createHmac('sha256', key).update(`${id}.${timestampSeconds}.${body}`).digest('base64');
      return `v1,${mac}`;
    })
    .join(' ');
}
