import { createHash, createHmac, type Hash, type Hmac } from 'node:crypto';
import { defaultProvider } from '@aws-sdk/credential-provider-node';
import { SignatureV4 } from '@smithy/signature-v4';
import { Agent, request } from 'undici';
import type { FhirReadConfig } from '../config.js';
import type { ResourceChange } from '../core/types.js';

/**
 * Reads the resource an event names from the FHIR server, for the content stage: the current
 * version after a create or an update, the last version before a delete (from the instance's
 * `_history`). HealthLake is read with SigV4 (service `healthlake`, the AWS SDK's default
 * credential chain); any other FHIR server at a base URL with a bearer token or without one.
 *
 * Answers:
 * - `{ resource }`;
 * - `{ missing }`, with the reason: the server has no version of it (never there, or expunged), or
 *   after a delete it cannot say what was deleted (no `_history`: 400, 405, 501). Nothing to match,
 *   and retrying would not change that;
 * - `ContentUnavailableError`: it could not be read now (unreachable, past the timeout, 401/403,
 *   429, 5xx, any other refusal, an answer that is not the resource). The ingest request then fails
 *   with a 503 and stores nothing, so the sender (EventBridge) tries again later; nothing is
 *   delivered unfiltered.
 */

export class ContentUnavailableError extends Error {}

export type ReadResult = { readonly resource: Record<string, unknown> } | { readonly missing: string };

export interface ResourceReader {
  read(change: ResourceChange): Promise<ReadResult>;
  close(): Promise<void>;
}

/** Answers to `_history` that say the server keeps no history to read, for good. */
const NO_HISTORY = new Set([400, 405, 501]);

/** 8 MiB: a FHIR resource (a Binary aside) is far smaller; a larger answer is refused, not buffered. */
const MAX_ANSWER_BYTES = 8 * 1024 * 1024;
/** Versions asked for from `_history` (newest first): the delete itself, then what it deleted. */
const HISTORY_COUNT = 5;

export class FhirReader implements ResourceReader {
  readonly #config: FhirReadConfig;
  readonly #agent: Agent;
  readonly #signer: SignatureV4 | undefined;

  constructor(config: FhirReadConfig, deps: { signer?: SignatureV4 } = {}) {
    this.#config = config;
    this.#agent = new Agent({
      connect: { timeout: config.timeoutMs },
      headersTimeout: config.timeoutMs,
      bodyTimeout: config.timeoutMs,
      maxResponseSize: MAX_ANSWER_BYTES,
      connections: 16,
    });
    this.#signer =
      config.auth !== 'sigv4'
        ? undefined
        : (deps.signer ??
          new SignatureV4({
            service: 'healthlake',
            region: config.region,
            credentials: defaultProvider(),
            sha256: Sha256,
          }));
  }

  async read(change: ResourceChange): Promise<ReadResult> {
    const id = change.resourceId;
    if (id === undefined) return { missing: 'the event names no resource id' };
    const base = this.#config.baseUrl ?? change.fhirBase.replace(/\/+$/, '');
    const path = `${base}/${change.resourceType}/${encodeURIComponent(id)}`;
    // Messages name the server and the type, never the resource id (they reach logs).
    const read = `the read of a ${change.resourceType} at ${base}`;
    if (change.interaction !== 'delete') {
      const current = await this.#get(path, read);
      if (current.status === 200) return { resource: this.#resource(current.body, change, read) };
      if (current.status !== 404 && current.status !== 410) throw unavailable(read, current.status);
    }
    // Deleted (or gone since the event): the newest version that still has the resource.
    const history = `the history read of a ${change.resourceType} at ${base}`;
    const versions = await this.#get(`${path}/_history?_count=${HISTORY_COUNT}`, history);
    if (versions.status === 404 || versions.status === 410) return { missing: 'the server has no version of it' };
    if (NO_HISTORY.has(versions.status)) {
      return { missing: `${history} answered ${versions.status}: the server keeps no history to read` };
    }
    if (versions.status !== 200) throw unavailable(history, versions.status);
    const bundle = versions.body as { resourceType?: unknown; entry?: unknown };
    if (bundle?.resourceType !== 'Bundle') throw new ContentUnavailableError(`${history} did not answer a Bundle`);
    const entries = Array.isArray(bundle.entry) ? (bundle.entry as { resource?: unknown }[]) : [];
    const last = entries.find((e) => typeof e?.resource === 'object' && e.resource !== null);
    return last === undefined
      ? { missing: 'its history holds no version with the resource' }
      : { resource: this.#resource(last.resource, change, history) };
  }

  close(): Promise<void> {
    return this.#agent.close();
  }

  #resource(body: unknown, change: ResourceChange, where: string): Record<string, unknown> {
    const r = body as Record<string, unknown> | null;
    if (r?.resourceType !== change.resourceType || r.id !== change.resourceId) {
      throw new ContentUnavailableError(`${where} did not answer the ${change.resourceType} itself`);
    }
    return r;
  }

  async #get(url: string, what: string): Promise<{ status: number; body: unknown }> {
    const target = new URL(url);
    let headers: Record<string, string> = { accept: 'application/fhir+json' };
    if (this.#config.auth === 'bearer') headers.authorization = `Bearer ${this.#config.token}`;
    if (this.#signer !== undefined) headers = await this.#sign(target, headers);
    let res: Awaited<ReturnType<typeof request>>;
    try {
      // One deadline for the whole read: the Agent's timeouts are per phase (a body trickled in
      // small chunks would pass its bodyTimeout chunk by chunk).
      res = await request(target, {
        method: 'GET',
        headers,
        dispatcher: this.#agent,
        signal: AbortSignal.timeout(this.#config.timeoutMs),
      });
    } catch (err) {
      throw new ContentUnavailableError(`${what} failed: ${(err as Error).message}`, { cause: err });
    }
    if (res.statusCode !== 200) {
      await res.body.dump().catch(() => undefined);
      return { status: res.statusCode, body: undefined };
    }
    try {
      return { status: 200, body: await res.body.json() };
    } catch (err) {
      if ((err as Error).name === 'TimeoutError' || (err as Error).name === 'AbortError') {
        throw new ContentUnavailableError(`${what} failed: no whole answer within ${this.#config.timeoutMs} ms`, {
          cause: err,
        });
      }
      throw new ContentUnavailableError(`${what}: the answer is not JSON (${(err as Error).message})`, {
        cause: err,
      });
    }
  }

  async #sign(url: URL, headers: Record<string, string>): Promise<Record<string, string>> {
    const query: Record<string, string> = {};
    for (const [k, v] of url.searchParams) query[k] = v;
    try {
      const signed = await (this.#signer as SignatureV4).sign({
        method: 'GET',
        protocol: url.protocol,
        hostname: url.hostname,
        ...(url.port === '' ? {} : { port: Number(url.port) }),
        path: url.pathname,
        query,
        headers: { ...headers, host: url.host },
      });
      return signed.headers as Record<string, string>;
    } catch (err) {
      // No credentials in the chain, say: a fault to fix, and the events wait for it.
      throw new ContentUnavailableError(`cannot sign the FHIR read (SigV4): ${(err as Error).message}`, { cause: err });
    }
  }
}

function unavailable(what: string, status: number): ContentUnavailableError {
  return new ContentUnavailableError(`${what} answered ${status}`);
}

type SourceData = string | ArrayBuffer | ArrayBufferView;

/** SHA-256 for the SigV4 signer (its `Checksum` interface), from node:crypto. */
export class Sha256 {
  readonly #secret: Buffer | undefined;
  #hash: Hash | Hmac;

  constructor(secret?: SourceData) {
    this.#secret = secret === undefined ? undefined : bytes(secret);
    this.#hash = this.#fresh();
  }

  update(data: SourceData): void {
    this.#hash.update(bytes(data));
  }

  async digest(): Promise<Uint8Array> {
    return new Uint8Array(this.#hash.digest());
  }

  reset(): void {
    this.#hash = this.#fresh();
  }

  #fresh(): Hash | Hmac {
    return this.#secret === undefined ? createHash('sha256') : createHmac('sha256', this.#secret);
  }
}

function bytes(data: SourceData): Buffer {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (ArrayBuffer.isView(data)) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return Buffer.from(data);
}
