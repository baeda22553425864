import { describe, expect, it } from 'vitest';
import type { SendResult, WebhookRequest } from './rest-hook-sender.js';
import { decodeResults, decodeRuns, encodeResults, encodeRun, type Wire } from './sender-thread-protocol.js';

describe('sender thread wire format', () => {
  it('carries a batch of runs through unchanged, whatever their length, headers and secrets', () => {
    const a: WebhookRequest = {
      endpoint: 'https://a.example/hook?x=1',
      headers: ['Authorization: Bearer t', 'X-Two: 2'],
      contentType: 'application/fhir+json',
      body: '{"resourceType":"Bundle"}',
      webhookId: 's1-4',
      secrets: ['whsec_AAAA', 'whsec_BBBB'],
      timeoutMs: 10_000,
    };
    const b: WebhookRequest = {
      endpoint: 'https://b.example/',
      headers: [],
      body: '',
      webhookId: 's2-1',
      secrets: [],
      timeoutMs: 1,
    };
    const c: WebhookRequest = {
      endpoint: 'https://c.example/',
      headers: ['H: v'],
      body: 'x',
      webhookId: 's3-9-12',
      secrets: ['k'],
      timeoutMs: 5,
    };
    // A classic Subscription's update of the resource on a FHIR service base.
    const d: WebhookRequest = {
      endpoint: 'https://d.example/fhir?k=1',
      method: 'PUT',
      resourcePath: '/Patient/p-1',
      headers: [],
      contentType: 'application/fhir+json',
      body: '{"resourceType":"Patient","id":"p-1"}',
      webhookId: 's4-2',
      secrets: ['k'],
      timeoutMs: 5,
    };
    const e: WebhookRequest = { ...b, method: 'DELETE', resourcePath: '/Patient/p-1' };
    const runs: WebhookRequest[][] = [[a], [b, c, a], [c], [d, e]];
    const wire: Wire = [];
    const slot = (i: number) => (i === 1 ? -1 : 7 * i);
    for (const [i, run] of runs.entries()) encodeRun(wire, 100 + i, slot(i), run, 250 * i);
    const back: [number, number, WebhookRequest[], number][] = [];
    decodeRuns(structuredClone(wire), (id, s, reqs, withinMs) => back.push([id, s, reqs, withinMs]));
    expect(back).toEqual(runs.map((run, i) => [100 + i, slot(i), run, 250 * i]));
    expect('contentType' in (back[1]?.[2][0] ?? {})).toBe(false);
  });

  it('carries every shape of result through unchanged, in runs of any length', () => {
    const results: SendResult[] = [
      { ok: true, status: 204 },
      { ok: false, status: 410, error: 'HTTP 410' },
      { ok: false, status: 503, error: 'HTTP 503', retryAfterMs: 0 },
      { ok: false, status: 429, error: 'HTTP 429', retryAfterMs: 120_000 },
      { ok: false, error: 'timeout after 10000 ms' },
      { ok: false, error: 'endpoint refused: 10.0.0.1 is a private address', permanent: true },
    ];
    const ok: SendResult = { ok: true, status: 200 };
    // One run per shape (alone), then each failure after two successes, as a run ends.
    const runs = [...results.map((r) => [r]), ...results.slice(1).map((r) => [ok, ok, r])];
    const wire: Wire = [];
    for (const [i, run] of runs.entries()) encodeResults(wire, i + 1, run);
    const back: [number, SendResult[]][] = [];
    decodeResults(structuredClone(wire), (id, r) => back.push([id, r]));
    expect(back).toEqual(runs.map((run, i) => [i + 1, run]));
    for (const [, run] of back)
      for (const r of run) if (!r.ok && r.status === undefined) expect('status' in r).toBe(false);
  });
});
