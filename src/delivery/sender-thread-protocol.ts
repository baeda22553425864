import type { SendResult, WebhookRequest } from './rest-hook-sender.js';

/**
 * What crosses between the event loop and a webhook sender thread: batches of runs one way,
 * batches of their results the other, each a flat array of strings and numbers. One message per
 * batch (not per request) saves a thread wake-up each; flat arrays clone for a fraction of what
 * objects do. A run is the requests of `Sender.sendInOrder`: one or more, sent one after another.
 *
 * Run:     id, slot, withinMs, n, request × n (slot: where the thread counts the run's successes as they come,
 *          see `ThreadedSender`; -1: none. withinMs -1: the run was stopped before it was posted; send none).
 * Request: endpoint, contentType | null, body, webhookId, timeoutMs, method | null, resourcePath | null, h,
 *          header × h, s, secret × s.
 * Results: id, n, result × n (the requests attempted: none for a run stopped before it began).
 * Result:  ok (1 | 0), status (0: none), error | null, retryAfterMs (-1: none), permanent (1 | 0).
 * Stop:    the string 'stop' instead of an array: start no further request of any run.
 * Cancel:  `{ cancel: [id...] }`: start no further request of these runs (`RunStop`); posted after the
 *          batch that carried them, so a run is never cancelled before the thread has it.
 * Ready:   the string 'ready' from the thread, once it listens: no batch is posted to a thread before,
 *          so a run stopped while the thread loads (~0.5 s at start-up) is stopped in place and none
 *          of it goes out, not even its first request.
 */

export type Wire = (string | number | null)[];

export const STOP = 'stop';
export const READY = 'ready';

export interface Cancel {
  readonly cancel: readonly number[];
}

export type ToThread = Wire | typeof STOP | Cancel;

const NONE: readonly string[] = Object.freeze([]);

/** Where, from the start of its encoding, a run keeps `withinMs` (`CANCELLED` there: send none of it). */
export const WITHIN_AT = 2;
export const CANCELLED = -1;

export function encodeRun(
  out: Wire,
  id: number,
  slot: number,
  reqs: readonly WebhookRequest[],
  withinMs: number,
): void {
  out.push(id, slot, withinMs, reqs.length);
  for (const req of reqs) {
    out.push(
      req.endpoint,
      req.contentType ?? null,
      req.body,
      req.webhookId,
      req.timeoutMs,
      req.method ?? null,
      req.resourcePath ?? null,
      req.headers.length,
    );
    for (const h of req.headers) out.push(h);
    out.push(req.secrets.length);
    for (const s of req.secrets) out.push(s);
  }
}

export function decodeRuns(
  wire: Wire,
  each: (id: number, slot: number, reqs: WebhookRequest[], withinMs: number) => void,
): void {
  for (let i = 0; i < wire.length; ) {
    const id = wire[i] as number;
    const slot = wire[i + 1] as number;
    const withinMs = wire[i + 2] as number;
    const n = wire[i + 3] as number;
    i += 4;
    const reqs: WebhookRequest[] = [];
    for (let k = 0; k < n; k++) {
      const contentType = wire[i + 1] as string | null;
      const endpoint = wire[i] as string;
      const body = wire[i + 2] as string;
      const webhookId = wire[i + 3] as string;
      const timeoutMs = wire[i + 4] as number;
      const method = wire[i + 5] as WebhookRequest['method'] | null;
      const resourcePath = wire[i + 6] as string | null;
      const h = wire[i + 7] as number;
      const headers = h === 0 ? NONE : (wire.slice(i + 8, i + 8 + h) as string[]);
      i += 8 + h;
      const s = wire[i] as number;
      const secrets = s === 0 ? NONE : (wire.slice(i + 1, i + 1 + s) as string[]);
      i += 1 + s;
      const req: WebhookRequest =
        contentType === null
          ? { endpoint, headers, body, webhookId, secrets, timeoutMs }
          : { endpoint, headers, contentType, body, webhookId, secrets, timeoutMs };
      reqs.push(method === null ? req : { ...req, method, ...(resourcePath === null ? {} : { resourcePath }) });
    }
    each(id, slot, reqs, withinMs);
  }
}

export function encodeResults(out: Wire, id: number, results: readonly SendResult[]): void {
  out.push(id, results.length);
  for (const r of results) {
    if (r.ok) out.push(1, r.status, null, -1, 0);
    else out.push(0, r.status ?? 0, r.error, r.retryAfterMs ?? -1, r.permanent === true ? 1 : 0);
  }
}

export function decodeResults(wire: Wire, each: (id: number, results: SendResult[]) => void): void {
  for (let i = 0; i < wire.length; ) {
    const id = wire[i] as number;
    const n = wire[i + 1] as number;
    i += 2;
    const results: SendResult[] = [];
    for (let k = 0; k < n; k++, i += 5) {
      const status = wire[i + 1] as number;
      if (wire[i] === 1) {
        results.push({ ok: true, status });
        continue;
      }
      const retryAfterMs = wire[i + 3] as number;
      results.push({
        ok: false,
        ...(status === 0 ? {} : { status }),
        error: wire[i + 2] as string,
        ...(retryAfterMs === -1 ? {} : { retryAfterMs }),
        ...(wire[i + 4] === 1 ? { permanent: true } : {}),
      });
    }
    each(id, results);
  }
}
