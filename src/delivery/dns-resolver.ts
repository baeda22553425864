import { promises as dns, lookup as getaddrinfo, type LookupAddress } from 'node:dns';
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';

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
}

/** How long a read of the hosts file is used before it is read again. */
const HOSTS_TTL_MS = 5_000;

/** A resolver of names: the hosts file first, then A and AAAA records over DNS (c-ares). */
export function dnsResolver(options: DnsResolverOptions = {}): Resolver {
  const resolver = new dns.Resolver({ timeout: options.timeoutMs ?? 2_500, tries: options.tries ?? 2 });
  if (options.servers !== undefined) resolver.setServers([...options.servers]);
  const hosts = new HostsFile(options.hostsFile ?? '/etc/hosts');
  return async (host) => {
    const name = host.toLowerCase().replace(/\.$/, '');
    const listed = await hosts.addresses(name);
    if (listed.length > 0) return listed;
    const [v4, v6] = await Promise.allSettled([resolver.resolve4(name), resolver.resolve6(name)]);
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

/** /etc/hosts: `address name [aliases…]` lines, `#` comments; names matched case-insensitively. */
class HostsFile {
  readonly #path: string;
  #entries: Promise<Map<string, LookupAddress[]>> | undefined;
  #readAt = 0;

  constructor(path: string) {
    this.#path = path;
  }

  async addresses(name: string): Promise<readonly LookupAddress[]> {
    const now = Date.now();
    if (this.#entries === undefined || now - this.#readAt > HOSTS_TTL_MS) {
      this.#readAt = now;
      this.#entries = readFile(this.#path, 'utf8').then(parseHosts, () => new Map());
    }
    return (await this.#entries).get(name) ?? [];
  }
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
