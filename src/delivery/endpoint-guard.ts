import type { LookupAddress } from 'node:dns';
import { isIP } from 'node:net';
import { BrokerError } from '../core/errors.js';
import { type Allowlist, blockedReason, unbracket } from './address-policy.js';
import { dnsResolver, type Resolver, systemResolver } from './dns-resolver.js';

export type { Resolver } from './dns-resolver.js';

/**
 * The SSRF guard. At registration it refuses endpoints that are not https (unless allow-listed)
 * or that name or resolve to a blocked address. At delivery, `lookup` is the socket's resolver:
 * a DNS answer that changed since registration is checked again and the socket connects to the
 * vetted address itself, so there is no window between check and use.
 */

/**
 * How long a name may take to resolve before the registration is refused, or the attempt fails,
 * as unresolved (`ETIMEOUT`, retried on the schedule like any DNS failure): the attempt's connect
 * timeout. Names a client chose are resolved off the thread pool (dns-resolver.ts), so one that
 * hangs holds nothing but its own promise; an allow-listed name's getaddrinfo may hold a thread
 * for the system resolver's own timeouts, which this does not shorten (see `EndpointGuard.#lookup`).
 */
export const RESOLVE_TIMEOUT_MS = 10_000;

/** The resolver of names a client chose, one per process (or sender thread): see dns-resolver.ts. */
let clientNames: Resolver | undefined;
export const defaultResolver: Resolver = (host) => {
  clientNames ??= dnsResolver();
  return clientNames(host);
};

/** The endpoint's address is forbidden by the address policy: retrying cannot help. */
export class EndpointRefusedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EndpointRefusedError';
  }
}

/**
 * The endpoint's name did not resolve (NXDOMAIN, a DNS server down, an empty answer). A refusal at
 * registration; at delivery a failure like a refused connection, retried on the schedule: a DNS
 * outage of a few minutes must not dead-letter notifications or end heartbeats.
 */
export class EndpointUnresolvedError extends Error {
  /** The resolver's error code (`ENOTFOUND`, `ENODATA`, `ETIMEOUT`, `ESERVFAIL`, ...), when it gave one. */
  readonly code: string | undefined;

  constructor(code: string | undefined) {
    super(code === undefined ? 'does not resolve' : `does not resolve (${code})`);
    this.name = 'EndpointUnresolvedError';
    this.code = code;
  }
}

export class EndpointGuard {
  readonly #allow: Allowlist;
  /** Names a client chose. */
  readonly #resolve: Resolver;
  /** Allow-listed names: the operator's, resolved as the system does (search domains, nsswitch). */
  readonly #resolveAllowed: Resolver;
  readonly #timeoutMs: number;
  /** Resolutions under way, by name: concurrent lookups of one name share one. */
  readonly #resolving = new Map<string, Promise<readonly LookupAddress[]>>();

  constructor(
    allow: Allowlist,
    resolve: Resolver = defaultResolver,
    options: { resolveTimeoutMs?: number; resolveAllowed?: Resolver } = {},
  ) {
    this.#allow = allow;
    this.#resolve = resolve;
    // One resolver given (a test's): it answers for every name.
    this.#resolveAllowed = options.resolveAllowed ?? (resolve === defaultResolver ? systemResolver : resolve);
    this.#timeoutMs = options.resolveTimeoutMs ?? RESOLVE_TIMEOUT_MS;
  }

  /** Registration-time check; throws a BrokerError the HTTP edge turns into a 422. */
  async checkEndpoint(endpoint: string): Promise<URL> {
    let url: URL;
    try {
      url = new URL(endpoint);
    } catch {
      // Not quoted back: an endpoint may carry a token (in its query, or its path as chat webhooks
      // do), and error bodies get logged along the way.
      throw refuse('INVALID_ENDPOINT', 'channel.endpoint is not an absolute URL (https://host/path)');
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
      throw refuse('INVALID_ENDPOINT', `channel.endpoint must be https, not ${url.protocol.replace(':', '')}`);
    }
    if (url.username !== '' || url.password !== '') {
      throw refuse('INVALID_ENDPOINT', 'channel.endpoint must not carry credentials; use channel.header');
    }
    const plainHttp = this.plainHttpRefusal(url);
    if (plainHttp !== undefined) throw refuse('INVALID_ENDPOINT', `channel.endpoint ${plainHttp}`);
    const host = unbracket(url.hostname);
    if (this.#allow.hasHost(host)) return url;
    try {
      await this.vet(host);
    } catch (err) {
      throw refuse('ENDPOINT_FORBIDDEN', `channel.endpoint ${host}: ${(err as Error).message}`);
    }
    return url;
  }

  /**
   * Why `url` may not be called: plain http to a host (as written in the URL, a name or an
   * address) that is not on the allow-list; undefined when it may. Asked at registration and, by
   * the sender, at delivery: an endpoint registered while its host was allow-listed is not called
   * in clear text once a restart took it off.
   */
  plainHttpRefusal(url: URL): string | undefined {
    if (url.protocol !== 'http:') return undefined;
    const host = unbracket(url.hostname);
    if (this.#allow.hasHost(host) || this.#allow.hasAddress(host)) return undefined;
    return `must be https; ${host} is not on BROKER_ENDPOINT_ALLOWLIST`;
  }

  /**
   * Resolve `host` and return the addresses a socket may use; throws EndpointRefusedError (a
   * forbidden address) or EndpointUnresolvedError (no answer).
   */
  async vet(host: string): Promise<readonly LookupAddress[]> {
    const literal = isIP(host);
    if (literal !== 0) {
      this.#assertAllowed(host);
      return [{ address: host, family: literal }];
    }
    let addresses: readonly LookupAddress[];
    try {
      addresses = await this.#lookup(host);
    } catch (err) {
      throw new EndpointUnresolvedError((err as NodeJS.ErrnoException).code ?? 'DNS error');
    }
    if (addresses.length === 0) throw new EndpointUnresolvedError(undefined);
    // An allow-listed name may resolve to any address (a service on the private network).
    if (this.#allow.hasHost(host)) return addresses;
    // Every answer must pass: a round-robin record with one private address is a rebinding tool.
    for (const a of addresses) this.#assertAllowed(a.address, host);
    return addresses;
  }

  /**
   * One resolution per name at a time, shared by every socket and registration of this guard that
   * wants it meanwhile, and given up on (not cancelled) after the timeout. For an allow-listed name
   * (getaddrinfo, on the thread pool) whose DNS hangs, that is one of the pool's four threads per
   * guard (each sender thread has its own) however many connections want it; a client's names
   * take no thread at all (dns-resolver.ts).
   */
  #lookup(host: string): Promise<readonly LookupAddress[]> {
    let resolving = this.#resolving.get(host);
    if (resolving === undefined) {
      const started = this.#allow.hasHost(host) ? this.#resolveAllowed(host) : this.#resolve(host);
      resolving = started;
      this.#resolving.set(host, started);
      const forget = (): void => {
        if (this.#resolving.get(host) === started) this.#resolving.delete(host);
      };
      started.then(forget, forget);
    }
    const shared = resolving;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(Object.assign(new Error(`no answer within ${this.#timeoutMs} ms`), { code: 'ETIMEOUT' })),
        this.#timeoutMs,
      );
      timer.unref();
      shared.then(
        (addresses) => {
          clearTimeout(timer);
          resolve(addresses);
        },
        (err: unknown) => {
          clearTimeout(timer);
          reject(err);
        },
      );
    });
  }

  /** A `net.connect` / undici `connect.lookup` resolver that only ever yields vetted addresses. */
  readonly lookup = (
    hostname: string,
    options: { all?: boolean } | number | undefined,
    callback: (err: Error | null, address: string | LookupAddress[], family?: number) => void,
  ): void => {
    const all = typeof options === 'object' && options !== null && options.all === true;
    this.vet(unbracket(hostname)).then(
      (addresses) => {
        const first = addresses[0] as LookupAddress;
        if (all) callback(null, [...addresses]);
        else callback(null, first.address, first.family);
      },
      (err: unknown) => callback(err as Error, all ? [] : '', 0),
    );
  };

  /**
   * For a name (`host`), the refusal says what kind of address it resolves to, not which: the
   * reason reaches the client (a 422, `Subscription.error`), and naming the address would let any
   * API client map the internal addresses of names it guesses.
   */
  #assertAllowed(ip: string, host?: string): void {
    if (this.#allow.hasAddress(ip)) return;
    const reason = blockedReason(ip);
    if (reason === undefined) return;
    throw new EndpointRefusedError(
      host === undefined ? `${ip} is a ${reason} address` : `resolves to a ${reason} address`,
    );
  }
}

function refuse(code: 'INVALID_ENDPOINT' | 'ENDPOINT_FORBIDDEN', message: string): BrokerError {
  return new BrokerError(code, message, { expression: 'Subscription.channel.endpoint' });
}
