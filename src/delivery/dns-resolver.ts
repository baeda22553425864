import { promises as dns, lookup as getaddrinfo, type LookupAddress } from 'node:dns';
import { readFile, stat } from 'node:fs/promises';
import { isIP } from 'node:net';
import { Slots } from '../core/slots.js';

/**
 * How the SSRF guard resolves endpoint names without libuv's thread pool.
 *
 * `dns.lookup` (getaddrinfo) runs on that pool, four threads shared by the whole process (file
 * access, the webhook sender thread's lookups, zlib). A name whose DNS servers never answer holds
 * a thread for the system resolver's own timeouts, and giving up on the promise does not free it:
 * one API client registering a few such names at once (any domain it controls will do) held all
 * four, and every other client's registrations and deliveries by name failed with `ETIMEOUT`
 * meanwhile. So names a client chose are resolved with c-ares (`dns.promises.Resolver`, sockets on
 * the event loop, a timeout of its own), after the hosts file as getaddrinfo would read it.
 * Allow-listed names are the operator's: they keep getaddrinfo (search domains, nsswitch), as a
 * service on the private network may need.
 */

export type Resolver = (host: string) => Promise<readonly LookupAddress[]>;

export interface DnsResolverOptions {
  /** DNS servers (`host` or `host:port`), instead of those of /etc/resolv.conf. */
  readonly servers?: readonly string[];
  /** The hosts file read before DNS (default /etc/hosts; none if it cannot be read). */
  readonly hostsFile?: string;
  /** c-ares's timeout of one query try, in ms, and tries per server. */
  readonly timeoutMs?: number;
  readonly tries?: number;
  /** Names resolved over DNS at once; more wait their turn (default MAX_IN_FLIGHT). */
  readonly maxInFlight?: number;
}

/** How often the hosts file and /etc/resolv.conf are checked for a change (their mtime). */
const CHECK_EVERY_MS = 5_000;
/**
 * Names resolved over DNS at once (two queries each, A and AAAA): getaddrinfo's four threads
 * bounded this before; without a bound, a client registering thousands of names at once would
 * send its resolver thousands of packets (cloud resolvers limit packets per interface).
 */
export const MAX_IN_FLIGHT = 32;

/** A resolver of names: the hosts file first, then A and AAAA records over DNS (c-ares). */
export function dnsResolver(options: DnsResolverOptions = {}): Resolver {
  const files = new SystemFiles(options.hostsFile ?? '/etc/hosts');
  const make = (): InstanceType<typeof dns.Resolver> => {
    const r = new dns.Resolver({ timeout: options.timeoutMs ?? 2_500, tries: options.tries ?? 2 });
    if (options.servers !== undefined) r.setServers([...options.servers]);
    return r;
  };
  let resolver = make();
  let resolverOf = files.resolvConfVersion;
  const slots = new Slots(options.maxInFlight ?? MAX_IN_FLIGHT);
  return async (host) => {
    const name = host.toLowerCase().replace(/\.$/, '');
    const listed = (await files.hosts()).get(name);
    if (listed !== undefined && listed.length > 0) return [...listed];
    // A new /etc/resolv.conf (DHCP, a VPN, a container's rewritten at start) takes effect, as
    // getaddrinfo reloads it: c-ares reads it once, when a Resolver is made.
    if (files.resolvConfVersion !== resolverOf) {
      resolverOf = files.resolvConfVersion;
      resolver = make();
    }
    const current = resolver;
    const [v4, v6] = await slots.run(() => Promise.allSettled([current.resolve4(name), current.resolve6(name)]));
    const addresses: LookupAddress[] = [
      ...(v4.status === 'fulfilled' ? v4.value.map((address) => ({ address, family: 4 })) : []),
      ...(v6.status === 'fulfilled' ? v6.value.map((address) => ({ address, family: 6 })) : []),
    ];
    if (addresses.length > 0) return addresses;
    // Neither family answered: say why, preferring a failure over "no record of this family".
    const failures = [v4, v6].flatMap((r) => (r.status === 'rejected' ? [r.reason as NodeJS.ErrnoException] : []));
    throw (
      failures.find((e) => e.code !== 'ENODATA') ??
      failures[0] ??
      Object.assign(new Error('no address'), { code: 'ENODATA' })
    );
  };
}

/** getaddrinfo on the thread pool: for names the operator allow-listed (see above). */
export const systemResolver: Resolver = (host) =>
  new Promise((resolve, reject) => {
    getaddrinfo(host, { all: true, verbatim: true }, (err, addresses) => (err ? reject(err) : resolve(addresses)));
  });

/**
 * The hosts file and /etc/resolv.conf, watched by their mtime every CHECK_EVERY_MS in the
 * background. Only the first lookup waits for the hosts file; later ones use the map they find,
 * so a busy thread pool (file reads) never holds a lookup up.
 */
class SystemFiles {
  readonly #hostsPath: string;
  #hosts: Promise<Map<string, LookupAddress[]>> | undefined;
  #hostsMtime = -1;
  #resolvMtime = -1;
  #checkedAt = 0;
  #checking = false;
  /** Changes when /etc/resolv.conf does. */
  resolvConfVersion = 0;

  constructor(hostsPath: string) {
    this.#hostsPath = hostsPath;
  }

  hosts(): Promise<Map<string, LookupAddress[]>> {
    if (this.#hosts === undefined) {
      this.#checkedAt = Date.now();
      this.#hosts = this.#readHosts();
      void mtimeOf(RESOLV_CONF).then((m) => {
        this.#resolvMtime = m;
      });
    } else if (!this.#checking && Date.now() - this.#checkedAt > CHECK_EVERY_MS) {
      this.#checkedAt = Date.now();
      this.#checking = true;
      void this.#check().finally(() => {
        this.#checking = false;
      });
    }
    return this.#hosts;
  }

  async #readHosts(): Promise<Map<string, LookupAddress[]>> {
    this.#hostsMtime = await mtimeOf(this.#hostsPath);
    return readFile(this.#hostsPath, 'utf8').then(parseHosts, () => new Map());
  }

  async #check(): Promise<void> {
    if ((await mtimeOf(this.#hostsPath)) !== this.#hostsMtime) {
      const next = await this.#readHosts();
      this.#hosts = Promise.resolve(next);
    }
    const resolvMtime = await mtimeOf(RESOLV_CONF);
    if (resolvMtime !== this.#resolvMtime) {
      this.#resolvMtime = resolvMtime;
      this.resolvConfVersion++;
    }
  }
}

const RESOLV_CONF = '/etc/resolv.conf';

/** A file's mtime in ms; 0 when it cannot be read. */
function mtimeOf(path: string): Promise<number> {
  return stat(path).then(
    (s) => s.mtimeMs,
    () => 0,
  );
}

export function parseHosts(text: string): Map<string, LookupAddress[]> {
  const entries = new Map<string, LookupAddress[]>();
  for (const line of text.split('\n')) {
    const [address = '', ...names] = (line.split('#')[0] ?? '').trim().split(/\s+/);
    // (A zone id, `fe80::1%lo`, names a link-local address: refused anyway, so left out.)
    const family = isIP(address);
    if (family === 0 || address.includes('%')) continue;
    for (const n of names) {
      const key = n.toLowerCase().replace(/\.$/, '');
      const list = entries.get(key) ?? [];
      if (!list.some((a) => a.address === address)) list.push({ address, family });
      entries.set(key, list);
    }
  }
  return entries;
}
