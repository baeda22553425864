import { isIP } from 'node:net';
import { Agent, type Dispatcher, errors as undiciErrors } from 'undici';
import { memo } from '../core/memo.js';
import type { Clock } from '../core/types.js';
import { unbracket } from './address-policy.js';
import { type EndpointGuard, EndpointRefusedError, EndpointUnresolvedError } from './endpoint-guard.js';
import { secretKey, signWithKeys } from './webhook-signature.js';

/**
 * Sends one signed HTTP POST to a rest-hook endpoint. One undici Agent (keep-alive pool) for the
 * process, whose sockets resolve through the SSRF guard; redirects are never followed (a 3xx is a
 * failure) and at most 64 KiB of a response is read.
 */

export interface WebhookRequest {
  readonly endpoint: string;
  /**
   * Absent: POST to the endpoint. A classic Subscription with a payload (R4: the endpoint is a FHIR
   * service base) updates the resource there instead: `PUT` (or `DELETE`) to the endpoint's path
   * plus `resourcePath` (`/Patient/123`), its query kept.
   */
  readonly method?: 'PUT' | 'DELETE';
  readonly resourcePath?: string;
  /** `Name: value` pairs from `channel.header`. */
  readonly headers: readonly string[];
  /** Absent: an empty-body POST (classic subscription without payload). */
  readonly contentType?: string;
  readonly body: string;
  readonly webhookId: string;
  readonly secrets: readonly string[];
  readonly timeoutMs: number;
}

export type SendResult =
  | { readonly ok: true; readonly status: number }
  | {
      readonly ok: false;
      /** HTTP status, or undefined when no response came (refused, timeout, blocked). */
      readonly status?: number;
      readonly error: string;
      /** From `Retry-After`, when the endpoint asked for a pause. */
      readonly retryAfterMs?: number;
      /** The endpoint is forbidden by the SSRF guard: retrying cannot help. */
      readonly permanent?: boolean;
    };

export interface Sender {
  send(req: WebhookRequest): Promise<SendResult>;
  /**
   * Sends `reqs` one after another, each once the one before it succeeded: a subscription's
   * notifications in order, with no trip back to the caller between them. Answers the results of
   * the requests attempted, in order: successes, then at most one failure (the run stops there).
   * The first request is always attempted unless `run` was stopped before the run began (then
   * none is: the answer is empty); no later one starts once `withinMs` have passed since the run
   * began, after `stop`, or after `run.stop()`.
   */
  sendInOrder(reqs: readonly WebhookRequest[], withinMs: number, run?: RunStop): Promise<SendResult[]>;
  /** Shutting down: runs in progress start no further request (each answers what it attempted). */
  stop(): void;
  close(): Promise<void>;
}

/**
 * Ends one run early: once `stop()` is called no further request of the run starts (the one on the
 * wire finishes and is answered). The dispatcher stops a subscription's run when the client
 * deletes or changes the subscription, so its notifications stop going to an endpoint it left.
 */
export class RunStop {
  #stopped = false;
  #listener: (() => void) | undefined;

  get stopped(): boolean {
    return this.#stopped;
  }

  stop(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#listener?.();
  }

  /** For a sender that must pass the stop on (to another thread): `fn` runs once, at `stop()`. */
  onStop(fn: () => void): void {
    this.#listener = fn;
  }
}

/**
 * `Sender.sendInOrder` over a single-request `send`. A `send` that throws ends the run with that
 * request failed (the ones before it keep their results). `delivered` hears each success as it
 * comes (how many so far, and its status), for a caller that must know how far a run got should
 * it never answer.
 */
export async function sendInOrder<R>(
  send: (req: R) => Promise<SendResult>,
  reqs: readonly R[],
  withinMs: number,
  clock: Clock,
  stopped: () => boolean,
  delivered?: (count: number, status: number) => void,
): Promise<SendResult[]> {
  const results: SendResult[] = [];
  const until = clock.now() + withinMs;
  for (const req of reqs) {
    if (results.length > 0 && (stopped() || clock.now() >= until)) break;
    const result = await send(req).catch(
      (err: unknown): SendResult => ({ ok: false, error: `sender failed: ${(err as Error).message}` }),
    );
    results.push(result);
    if (!result.ok) break;
    delivered?.(results.length, result.status);
  }
  return results;
}

const MAX_RESPONSE_BYTES = 64 * 1024;
/** TCP and TLS connect, whatever the subscription's timeout. */
const CONNECT_TIMEOUT_MS = 10_000;
const IDLE_SOCKET_MS = 4_000;

interface Target {
  readonly origin: string;
  /** Path and query, as sent in the request line. */
  readonly path: string;
  /** The path alone, without a trailing `/`, and the query (`?…` or empty): for a `resourcePath`. */
  readonly base: string;
  readonly query: string;
  /** Set when the endpoint names an IP address (vetted on every attempt). */
  readonly ipLiteral?: string;
  /** Set when the guard refuses the endpoint as written (plain http off the allow-list). */
  readonly refused?: string;
}

export class RestHookSender implements Sender {
  readonly #agent: Agent;
  readonly #clock: Clock;
  readonly #userAgent: string;
  readonly #connectTimeoutMs: number;

  readonly #guard: EndpointGuard;
  /** Parsed endpoints: the URL is parsed once, not on every attempt. */
  readonly #targets = new Map<string, Target>();
  /** Decoded signing keys, per secret. */
  readonly #keys = new Map<string, Buffer>();
  /**
   * IP-literal hosts the guard passed. Its verdict on an address is fixed for its life (the
   * allow-list is read at start-up), so it is asked once per address, not on every attempt.
   */
  readonly #vetted = new Set<string>();
  #stopped = false;

  constructor(
    guard: EndpointGuard,
    clock: Clock,
    options: { connections?: number; userAgent?: string; connectTimeoutMs?: number } = {},
  ) {
    this.#guard = guard;
    this.#clock = clock;
    this.#userAgent = options.userAgent ?? 'fhir-subscription-broker';
    this.#connectTimeoutMs = options.connectTimeoutMs ?? CONNECT_TIMEOUT_MS;
    this.#agent = new Agent({
      connections: options.connections ?? 32,
      connect: { lookup: guard.lookup as never, timeout: this.#connectTimeoutMs },
      // Idle sockets go after 4 s (undici's default): endpoints' servers close theirs after a few
      // seconds (5 s is common), and a request sent on a socket the endpoint is closing is lost.
      keepAliveTimeout: IDLE_SOCKET_MS,
    });
  }

  async send(req: WebhookRequest): Promise<SendResult> {
    const timestamp = Math.floor(this.#clock.now() / 1000);
    // Encoded once: the bytes signed are the bytes sent.
    const body = Buffer.from(req.body);
    const headers: Record<string, string> = {
      'user-agent': this.#userAgent,
      'webhook-id': req.webhookId,
      'webhook-timestamp': String(timestamp),
      'webhook-signature': signWithKeys(this.#keysOf(req.secrets), req.webhookId, timestamp, body),
    };
    if (req.contentType !== undefined) headers['content-type'] = req.contentType;
    for (const h of req.headers) {
      const colon = h.indexOf(':');
      headers[h.slice(0, colon).trim().toLowerCase()] = h.slice(colon + 1).trim();
    }
    try {
      const target = this.#target(req.endpoint);
      // Sockets skip `lookup` for IP literals: vet those here, before the first attempt of this
      // process, so an allow-list changed by a restart applies to endpoints registered before it.
      const literal = target.ipLiteral;
      if (literal !== undefined && !this.#vetted.has(literal)) {
        await this.#guard.vet(literal);
        this.#vetted.add(literal);
      }
      // Likewise plain http to a host taken off the allow-list: refused, never sent in clear text.
      if (target.refused !== undefined) throw new EndpointRefusedError(target.refused);
      // headersTimeout bounds the wait for the answer from the moment the request is on the wire,
      // not counting time queued for a connection: the dispatcher hands an origin at most twice as
      // many requests as it has connections, so a request may wait about one attempt ahead of it,
      // and the endpoint still gets its whole timeout for its answer. Connecting is bounded
      // separately (connect.timeout).
      const deadline = performance.now() + req.timeoutMs;
      let res: Dispatcher.ResponseData;
      try {
        res = await this.#post(target, req, headers, body);
      } catch (err) {
        // A kept-alive socket the endpoint closed as this request went out (its idle timeout ran
        // out first: servers close after a few seconds, often without saying so in Keep-Alive)
        // took nothing: tried once more on a new connection, under the same webhook-id, rather
        // than fail an attempt (or a handshake, which has no retry) the endpoint never saw.
        if (!isStaleSocket(err)) throw err;
        res = await this.#post(target, req, headers, body);
      }
      // Nothing to read (the usual answer): no timer to arm.
      const empty = res.statusCode === 204 || res.headers['content-length'] === '0';
      // Within the timeout from the call, so an attempt with a slow body stays within about one
      // timeout of its answer (the answer's status is all that decides the outcome).
      const timer = empty
        ? undefined
        : setTimeout(
            () => res.body.destroy(new undiciErrors.BodyTimeoutError()),
            Math.max(deadline - performance.now(), 0),
          );
      await res.body.dump({ limit: MAX_RESPONSE_BYTES }).catch(() => undefined);
      clearTimeout(timer);
      if (res.statusCode >= 200 && res.statusCode < 300) return { ok: true, status: res.statusCode };
      // A delete on a FHIR server that no longer has the resource (FHIR lets it answer 404 or 410)
      // is done: not a failure to retry, and its 410 is not the endpoint gone.
      if (req.method === 'DELETE' && (res.statusCode === 404 || res.statusCode === 410)) {
        return { ok: true, status: res.statusCode };
      }
      const retryAfterMs = parseRetryAfter(res.headers['retry-after'], this.#clock.now());
      const error =
        res.statusCode >= 300 && res.statusCode < 400
          ? `HTTP ${res.statusCode} redirect (not followed)`
          : `HTTP ${res.statusCode}`;
      return { ok: false, status: res.statusCode, error, ...(retryAfterMs === undefined ? {} : { retryAfterMs }) };
    } catch (err) {
      return describeFailure(err, req.timeoutMs, this.#connectTimeoutMs);
    }
  }

  /**
   * One POST. undici starts `headersTimeout` over at every interim (1xx) answer, so an endpoint
   * sending `102 Processing` every few seconds would hold the attempt, and its in-flight slots, for
   * good: an interim answer that comes more than the timeout after the first one ends it (thrown
   * from `onInfo`, undici aborts the request), so the final answer is due within about twice the
   * timeout of the first interim one. (No AbortSignal per attempt: creating one cost more than
   * signing the request.)
   */
  #post(target: Target, req: WebhookRequest, headers: Record<string, string>, body: Buffer) {
    const timeoutMs = req.timeoutMs;
    let firstInterim: number | undefined;
    return this.#agent.request({
      origin: target.origin,
      path: req.resourcePath === undefined ? target.path : `${target.base}${req.resourcePath}${target.query}`,
      method: req.method ?? 'POST',
      headers,
      body,
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
      onInfo: () => {
        const now = performance.now();
        firstInterim ??= now;
        if (now - firstInterim > timeoutMs) throw new undiciErrors.HeadersTimeoutError();
      },
    });
  }

  sendInOrder(
    reqs: readonly WebhookRequest[],
    withinMs: number,
    run?: RunStop,
    delivered?: (count: number, status: number) => void,
  ): Promise<SendResult[]> {
    if (run?.stopped === true) return Promise.resolve([]);
    return sendInOrder(
      (req) => this.send(req),
      reqs,
      withinMs,
      this.#clock,
      () => this.#stopped || run?.stopped === true,
      delivered,
    );
  }

  stop(): void {
    this.#stopped = true;
  }

  #keysOf(secrets: readonly string[]): Buffer[] {
    return secrets.map((secret) => memo(this.#keys, secret, secretKey));
  }

  #target(endpoint: string): Target {
    return memo(this.#targets, endpoint, (e) => parseTarget(e, this.#guard));
  }

  /** Aborts whatever is still in flight: callers give attempts their grace period first. */
  async close(): Promise<void> {
    await this.#agent.destroy();
  }
}

function parseTarget(endpoint: string, guard: EndpointGuard): Target {
  const url = new URL(endpoint);
  const host = unbracket(url.hostname);
  const refused = guard.plainHttpRefusal(url);
  return {
    origin: url.origin,
    path: `${url.pathname}${url.search}`,
    base: url.pathname.replace(/\/+$/, ''),
    query: url.search,
    ...(isIP(host) === 0 ? {} : { ipLiteral: host }),
    ...(refused === undefined ? {} : { refused }),
  };
}

/** The error's code, or its cause's (undici wraps socket errors). */
function errorCode(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException).code ?? (err as { cause?: NodeJS.ErrnoException }).cause?.code;
}

/** Closed or reset before any answer came: what a kept-alive socket the endpoint let go looks like. */
function isStaleSocket(err: unknown): boolean {
  const code = errorCode(err);
  return code === 'UND_ERR_SOCKET' || code === 'ECONNRESET' || code === 'EPIPE';
}

function describeFailure(err: unknown, timeoutMs: number, connectTimeoutMs: number): SendResult {
  const cause = (err as { cause?: unknown }).cause;
  if (err instanceof EndpointRefusedError || cause instanceof EndpointRefusedError) {
    const refused = err instanceof EndpointRefusedError ? err : (cause as EndpointRefusedError);
    return { ok: false, error: `endpoint refused: ${refused.message}`, permanent: true };
  }
  // Not permanent: DNS comes back, and the attempt is retried on the schedule.
  if (err instanceof EndpointUnresolvedError || cause instanceof EndpointUnresolvedError) {
    const unresolved = err instanceof EndpointUnresolvedError ? err : (cause as EndpointUnresolvedError);
    return { ok: false, error: `endpoint ${unresolved.message}` };
  }
  if (err instanceof undiciErrors.ConnectTimeoutError) {
    // Not the subscription's timeout: connecting has its own bound (the Agent's connect.timeout).
    return { ok: false, error: `connect timeout after ${connectTimeoutMs} ms` };
  }
  if (
    err instanceof undiciErrors.HeadersTimeoutError ||
    err instanceof undiciErrors.BodyTimeoutError ||
    (err as Error).name === 'TimeoutError' ||
    (err as Error).name === 'AbortError'
  ) {
    return { ok: false, error: `timeout after ${timeoutMs} ms` };
  }
  const code = errorCode(err);
  return { ok: false, error: code === undefined ? (err as Error).message : `connection failed (${code})` };
}

/** `Retry-After` as seconds or an HTTP date; capped at a day so a hostile value cannot park a queue forever. */
export function parseRetryAfter(value: string | string[] | undefined, nowMs: number): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined) return undefined;
  const DAY = 86_400_000;
  if (/^\d+$/.test(v.trim())) return Math.min(Number(v.trim()) * 1000, DAY);
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.min(Math.max(at - nowMs, 0), DAY);
}
