import { createHmac } from 'node:crypto';
import { Webhook, WebhookVerificationError } from 'standardwebhooks';
import { describe, expect, it } from 'vitest';
import { isWebhookSecret } from '../core/subscription.js';
import { generateWebhookSecret, signWebhook } from './webhook-signature.js';

const SECRET_A = `whsec_${Buffer.alloc(32, 0xa1).toString('base64')}`;
const SECRET_B = `whsec_${Buffer.alloc(24, 0xb2).toString('base64')}`;
const MESSAGE_ID = 'msg_2YbTJ8H4Zy9uN1';
const BODY = JSON.stringify({ resourceType: 'Bundle', type: 'history', entry: [] });

/** The verifier checks the timestamp against its own clock (5 minute tolerance), so sign "now". */
function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

function headers(id: string, timestamp: number, signature: string): Record<string, string> {
  return { 'webhook-id': id, 'webhook-timestamp': String(timestamp), 'webhook-signature': signature };
}

describe('signWebhook', () => {
  it('produces a signature the standardwebhooks reference library verifies', () => {
    const ts = nowSeconds();
    const signature = signWebhook([SECRET_A], MESSAGE_ID, ts, BODY);
    expect(signature).toMatch(/^v1,[A-Za-z0-9+/]{43}=$/);
    expect(new Webhook(SECRET_A).verify(BODY, headers(MESSAGE_ID, ts, signature))).toEqual(JSON.parse(BODY));
  });

  it('matches the reference library byte for byte', () => {
    const ts = 1_700_000_000;
    expect(signWebhook([SECRET_A], MESSAGE_ID, ts, BODY)).toBe(
      new Webhook(SECRET_A).sign(MESSAGE_ID, new Date(ts * 1000), BODY),
    );
  });

  it('is HMAC-SHA256 over "{id}.{timestamp}.{body}" with the decoded secret bytes', () => {
    const mac = createHmac('sha256', Buffer.alloc(32, 0xa1))
      .update(`${MESSAGE_ID}.1700000000.${BODY}`)
      .digest('base64');
    expect(signWebhook([SECRET_A], MESSAGE_ID, 1_700_000_000, BODY)).toBe(`v1,${mac}`);
  });

  it('signs a body given as its UTF-8 bytes as it signs the string, non-ASCII text included', () => {
    const ts = 1_700_000_000;
    const text = JSON.stringify({ resourceType: 'Patient', name: [{ text: 'Zoë Ødegård 患者 🩺' }] });
    const signature = signWebhook([SECRET_A], MESSAGE_ID, ts, Buffer.from(text));
    expect(signature).toBe(signWebhook([SECRET_A], MESSAGE_ID, ts, text));
    expect(signature).toBe(new Webhook(SECRET_A).sign(MESSAGE_ID, new Date(ts * 1000), text));
  });

  it('gives two space-separated signatures for two secrets, each verifiable on its own', () => {
    const ts = nowSeconds();
    const signature = signWebhook([SECRET_A, SECRET_B], MESSAGE_ID, ts, BODY);
    const parts = signature.split(' ');
    expect(parts).toHaveLength(2);
    expect(parts[0]).toBe(signWebhook([SECRET_A], MESSAGE_ID, ts, BODY));
    expect(parts[1]).toBe(signWebhook([SECRET_B], MESSAGE_ID, ts, BODY));
    expect(new Webhook(SECRET_A).verify(BODY, headers(MESSAGE_ID, ts, signature))).toEqual(JSON.parse(BODY));
    expect(new Webhook(SECRET_B).verify(BODY, headers(MESSAGE_ID, ts, signature))).toEqual(JSON.parse(BODY));
  });

  it('fails verification with another secret', () => {
    const ts = nowSeconds();
    const signature = signWebhook([SECRET_A], MESSAGE_ID, ts, BODY);
    expect(() => new Webhook(SECRET_B).verify(BODY, headers(MESSAGE_ID, ts, signature))).toThrow(
      WebhookVerificationError,
    );
  });

  it('fails verification when the body, id or timestamp changes', () => {
    const ts = nowSeconds();
    const signature = signWebhook([SECRET_A], MESSAGE_ID, ts, BODY);
    const wh = new Webhook(SECRET_A);
    expect(() => wh.verify(`${BODY} `, headers(MESSAGE_ID, ts, signature))).toThrow(WebhookVerificationError);
    expect(() => wh.verify(BODY, headers('msg_other', ts, signature))).toThrow(WebhookVerificationError);
    expect(() => wh.verify(BODY, headers(MESSAGE_ID, ts - 1, signature))).toThrow(WebhookVerificationError);
  });

  it('signs non-ASCII bodies over their UTF-8 bytes', () => {
    const ts = nowSeconds();
    const body = JSON.stringify({ resourceType: 'Patient', name: [{ family: 'Ñúñez 患者' }] });
    const signature = signWebhook([SECRET_A], MESSAGE_ID, ts, body);
    expect(new Webhook(SECRET_A).verify(body, headers(MESSAGE_ID, ts, signature))).toEqual(JSON.parse(body));
  });

  it('returns an empty header value for no secrets', () => {
    expect(signWebhook([], MESSAGE_ID, 1, BODY)).toBe('');
  });
});

describe('generateWebhookSecret', () => {
  it('generates distinct Standard Webhooks secrets of 32 bytes the reference library accepts', () => {
    const a = generateWebhookSecret();
    const b = generateWebhookSecret();
    expect(a).not.toBe(b);
    expect(isWebhookSecret(a)).toBe(true);
    expect(Buffer.from(a.slice('whsec_'.length), 'base64')).toHaveLength(32);
    const ts = nowSeconds();
    expect(new Webhook(a).verify(BODY, headers(MESSAGE_ID, ts, signWebhook([a], MESSAGE_ID, ts, BODY)))).toEqual(
      JSON.parse(BODY),
    );
  });
});
