import { isIP } from 'node:net';

/**
 * Which IP addresses a webhook may reach. Private, loopback, link-local (cloud metadata), CGNAT,
 * multicast and reserved ranges are refused, in IPv4, IPv6 and IPv4-mapped/compatible IPv6 forms,
 * unless an operator allow-lists them.
 */

interface Range {
  readonly net: bigint;
  readonly bits: number;
  readonly reason: string;
}

const V4_RANGES: readonly [string, number, string][] = [
  ['0.0.0.0', 8, 'unspecified ("this network")'],
  ['10.0.0.0', 8, 'private'],
  ['100.64.0.0', 10, 'carrier-grade NAT'],
  ['127.0.0.0', 8, 'loopback'],
  ['169.254.0.0', 16, 'link-local (cloud metadata)'],
  ['172.16.0.0', 12, 'private'],
  ['192.0.0.0', 24, 'IETF protocol assignments'],
  ['192.0.2.0', 24, 'documentation'],
  ['192.88.99.0', 24, '6to4 relay'],
  ['192.168.0.0', 16, 'private'],
  ['198.18.0.0', 15, 'benchmarking'],
  ['198.51.100.0', 24, 'documentation'],
  ['203.0.113.0', 24, 'documentation'],
  ['224.0.0.0', 4, 'multicast'],
  ['240.0.0.0', 4, 'reserved'],
];

const V6_RANGES: readonly [string, number, string][] = [
  ['::', 128, 'unspecified'],
  ['::1', 128, 'loopback'],
  ['64:ff9b:1::', 48, 'local NAT64'],
  ['100::', 64, 'discard-only'],
  ['2001::', 23, 'IETF protocol assignments'],
  ['2001:db8::', 32, 'documentation'],
  ['2002::', 16, '6to4 (embeds an IPv4 address)'],
  ['fc00::', 7, 'unique local (private)'],
  ['fe80::', 10, 'link-local'],
  ['fec0::', 10, 'site-local (deprecated)'],
  ['ff00::', 8, 'multicast'],
];

const NAT64_WELL_KNOWN = 0x64ff9bn << 64n;

const v4 = V4_RANGES.map(([a, bits, reason]) => ({ net: v4ToBig(a), bits, reason }));
const v6 = V6_RANGES.map(([a, bits, reason]) => ({ net: v6ToBig(a), bits, reason }));

export function v4ToBig(addr: string): bigint {
  return addr.split('.').reduce((acc, part) => (acc << 8n) | BigInt(Number(part)), 0n);
}

/** Expands any valid IPv6 text form (including a dotted IPv4 tail) to a 128-bit integer. */
export function v6ToBig(addr: string): bigint {
  let text = addr.split('%')[0] as string;
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (dotted !== null) {
    const n = v4ToBig(dotted[1] as string);
    text = `${text.slice(0, -(dotted[1] as string).length)}${(n >> 16n).toString(16)}:${(n & 0xffffn).toString(16)}`;
  }
  const [head = '', tail] = text.split('::') as [string, string | undefined];
  const headParts = head === '' ? [] : head.split(':');
  const tailParts = tail === undefined || tail === '' ? [] : tail.split(':');
  const fill = tail === undefined ? 0 : 8 - headParts.length - tailParts.length;
  const groups = [...headParts, ...Array<string>(fill).fill('0'), ...tailParts];
  return groups.reduce((acc, g) => (acc << 16n) | BigInt(Number.parseInt(g, 16)), 0n);
}

function inRange(value: bigint, width: number, r: Range): boolean {
  const shift = BigInt(width - r.bits);
  return value >> shift === r.net >> shift;
}

/** Why `ip` is not a public unicast address, or undefined when it is. */
export function blockedReason(ip: string): string | undefined {
  const family = isIP(ip);
  if (family === 4) return v4.find((r) => inRange(v4ToBig(ip), 32, r))?.reason;
  if (family !== 6) return 'not an IP address';
  const value = v6ToBig(ip);
  // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible) reach the embedded IPv4 address.
  const high = value >> 32n;
  // 64:ff9b::/96 (RFC 6052 NAT64) is forwarded by a NAT64 gateway to the embedded IPv4 address.
  if (high === 0xffffn || (high === 0n && value > 1n) || high === NAT64_WELL_KNOWN) {
    const embedded = value & 0xffffffffn;
    const asV4 = [24n, 16n, 8n, 0n].map((s) => String((embedded >> s) & 0xffn)).join('.');
    const reason = blockedReason(asV4);
    return reason === undefined ? undefined : `${reason} (IPv4 in IPv6)`;
  }
  const reserved = v6.find((r) => inRange(value, 128, r))?.reason;
  if (reserved !== undefined) return reserved;
  // Only global unicast (2000::/3) is routable on the internet; everything else is special-purpose.
  return value >> 125n === 1n ? undefined : 'non-global (outside 2000::/3)';
}

/** A host as URLs write it, without the brackets of an IPv6 literal (`[::1]` → `::1`). */
export const unbracket = (host: string): string => host.replace(/^\[|\]$/g, '');

const ENTRY_FORMS = 'entries are host names (hooks.internal), IP addresses (127.0.0.1, ::1) or CIDRs (10.0.0.0/8)';
/** A DNS name as URL parsing leaves it (lower case): labels of letters, digits, `-` and `_`. */
const HOST_NAME =
  /^(?=.{1,253}\.?$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$/;

/** Hosts or CIDRs exempt from the block (`BROKER_ENDPOINT_ALLOWLIST`). */
export class Allowlist {
  readonly #hosts = new Set<string>();
  readonly #cidrs: { family: 4 | 6; range: Range }[] = [];

  constructor(entries: readonly string[]) {
    for (const raw of entries) {
      const entry = unbracket(raw.trim().toLowerCase());
      if (entry.includes('://')) {
        throw new TypeError(`allowlist entry ${raw}: no scheme; ${ENTRY_FORMS}`);
      }
      const [addr = '', bitsText] = entry.split('/');
      const family = isIP(addr);
      if (family === 0) {
        if (bitsText !== undefined) throw new TypeError(`allowlist entry ${raw}: a CIDR needs an IP address`);
        // Matched against the host as written in an endpoint URL: an entry of another form never matches.
        if (entry.includes(':'))
          throw new TypeError(`allowlist entry ${raw}: no port (any port of a host is allowed); ${ENTRY_FORMS}`);
        if (entry.includes('*')) throw new TypeError(`allowlist entry ${raw}: no wildcards; ${ENTRY_FORMS}`);
        // A URL reads a host whose last label is a number (1.2.3, 0x7f.1) as an IPv4 address.
        if (/(^|\.)(0x[0-9a-f]*|\d+)\.?$/.test(entry)) {
          throw new TypeError(`allowlist entry ${raw}: write an IPv4 address as four decimal numbers; ${ENTRY_FORMS}`);
        }
        if (!HOST_NAME.test(entry)) {
          throw new TypeError(
            `allowlist entry ${raw}: not a host name (letters, digits, - and _; an internationalised name in its xn-- form); ${ENTRY_FORMS}`,
          );
        }
        this.#hosts.add(entry);
        continue;
      }
      const width = family === 4 ? 32 : 128;
      const bits = bitsText === undefined ? width : /^\d{1,3}$/.test(bitsText) ? Number(bitsText) : Number.NaN;
      if (!Number.isInteger(bits) || bits < 0 || bits > width)
        throw new TypeError(`allowlist entry ${raw}: bad prefix`);
      const net = family === 4 ? v4ToBig(addr) : v6ToBig(addr);
      this.#cidrs.push({ family: family as 4 | 6, range: { net, bits, reason: 'allowlisted' } });
    }
  }

  hasHost(host: string): boolean {
    return this.#hosts.has(unbracket(host.toLowerCase()));
  }

  hasAddress(ip: string): boolean {
    const family = isIP(ip);
    if (family === 0) return false;
    const value = family === 4 ? v4ToBig(ip) : v6ToBig(ip);
    return this.#cidrs.some((c) => c.family === family && inRange(value, family === 4 ? 32 : 128, c.range));
  }
}
