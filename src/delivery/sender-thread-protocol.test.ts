import { describe, expect, it } from 'vitest';
import type { SendResult, WebhookRequest } from './rest-hook-sender.js';
import { decodeRequests, decodeResults, encodeRequest, encodeResult, type Wire } from './sender-thread-protocol.js';

describe('sender thread wire format', () => {
  it('carries a batch of requests through unchanged, whatever their headers and secrets', () => {
    const requests: WebhookRequest[] = [
      {
        endpoint: 'https://a.example/hook?x=1',
        headers: ['Authorization: Bearer t', 'X-Two: 2'],
        contentType: 'application/fhir+json',
        body: '{"resourceType":"Bundle"}',
        webhookId: 's1-4',
        secrets: ['whsec_AAAA', 'whsec_BBBB'],
        timeoutMs: 10_000,
      },
      { endpoint: 'https://b.example/', headers: [], body: '', webhookId: 's2-1', secrets: [], timeoutMs: 1 },
      {
        endpoint: 'https://c.example/',
        headers: ['H: v'],
        body: 'x',
        webhookId: 's3-9-12',
        secrets: ['k'],
        timeoutMs: 5,
      },
    ];
    const wire: Wire = [];
    for (const [i, r] of requests.entries()) encodeRequest(wire, 100 + i, r);
    const back: [number, WebhookRequest][] = [];
    decodeRequests(structuredClone(wire), (id, req) => back.push([id, req]));
    expect(back).toEqual(requests.map((r, i) => [100 + i, r]));
    expect('contentType' in (back[1]?.[1] ?? {})).toBe(false);
  });

  it('carries every shape of result through unchanged', () => {
    const results: SendResult[] = [
      { ok: true, status: 204 },
      { ok: false, status: 410, error: 'HTTP 410' },
      { ok: false, status: 503, error: 'HTTP 503', retryAfterMs: 0 },
      { ok: false, status: 429, error: 'HTTP 429', retryAfterMs: 120_000 },
      { ok: false, error: 'timeout after 10000 ms' },
      { ok: false, error: 'endpoint refused: 10.0.0.1 is a private address', permanent: true },
    ];
    const wire: Wire = [];
    for (const [i, r] of results.entries()) encodeResult(wire, i + 1, r);
    const back: [number, SendResult][] = [];
    decodeResults(structuredClone(wire), (id, r) => back.push([id, r]));
    expect(back).toEqual(results.map((r, i) => [i + 1, r]));
    for (const [, r] of back) if (!r.ok && r.status === undefined) expect('status' in r).toBe(false);
  });
});
