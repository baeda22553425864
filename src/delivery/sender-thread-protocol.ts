import type { SendResult, WebhookRequest } from './rest-hook-sender.js';

/**
 * What crosses between the event loop and a webhook sender thread: batches of requests one way,
 * batches of results the other, each a flat array of strings and numbers. One message per batch
 * (not per request) saves a thread wake-up each; flat arrays clone for a fraction of what objects do.
 *
 * Request: id, endpoint, contentType | null, body, webhookId, timeoutMs, h, header × h, s, secret × s.
 * Result:  id, ok (1 | 0), status (0: none), error | null, retryAfterMs (-1: none), permanent (1 | 0).
 */

export type Wire = (string | number | null)[];

export function encodeRequest(out: Wire, id: number, req: WebhookRequest): void {
  out.push(id, req.endpoint, req.contentType ?? null, req.body, req.webhookId, req.timeoutMs, req.headers.length);
  for (const h of req.headers) out.push(h);
  out.push(req.secrets.length);
  for (const s of req.secrets) out.push(s);
}

export function decodeRequests(wire: Wire, each: (id: number, req: WebhookRequest) => void): void {
  for (let i = 0; i < wire.length; ) {
    const id = wire[i] as number;
    const contentType = wire[i + 2] as string | null;
    const base = {
      endpoint: wire[i + 1] as string,
      body: wire[i + 3] as string,
      webhookId: wire[i + 4] as string,
      timeoutMs: wire[i + 5] as number,
    };
    const h = wire[i + 6] as number;
    const headers = wire.slice(i + 7, i + 7 + h) as string[];
    i += 7 + h;
    const s = wire[i] as number;
    const secrets = wire.slice(i + 1, i + 1 + s) as string[];
    i += 1 + s;
    each(id, { ...base, headers, secrets, ...(contentType === null ? {} : { contentType }) });
  }
}

export function encodeResult(out: Wire, id: number, r: SendResult): void {
  if (r.ok) out.push(id, 1, r.status, null, -1, 0);
  else out.push(id, 0, r.status ?? 0, r.error, r.retryAfterMs ?? -1, r.permanent === true ? 1 : 0);
}

export function decodeResults(wire: Wire, each: (id: number, result: SendResult) => void): void {
  for (let i = 0; i < wire.length; i += 6) {
    const id = wire[i] as number;
    const status = wire[i + 2] as number;
    if (wire[i + 1] === 1) {
      each(id, { ok: true, status });
      continue;
    }
    const retryAfterMs = wire[i + 4] as number;
    each(id, {
      ok: false,
      ...(status === 0 ? {} : { status }),
      error: wire[i + 3] as string,
      ...(retryAfterMs === -1 ? {} : { retryAfterMs }),
      ...(wire[i + 5] === 1 ? { permanent: true } : {}),
    });
  }
}
