import { describe, expect, it } from 'vitest';
import { Allowlist, blockedReason, v4ToBig, v6ToBig } from './address-policy.js';

describe('blockedReason', () => {
  it.each([
    ['127.0.0.1', 'loopback'],
    ['127.255.255.254', 'loopback'],
    ['10.1.2.3', 'private'],
    ['172.16.0.1', 'private'],
    ['172.31.255.255', 'private'],
    ['192.168.1.1', 'private'],
    ['169.254.169.254', 'link-local (cloud metadata)'],
    ['100.64.0.1', 'carrier-grade NAT'],
    ['100.127.255.255', 'carrier-grade NAT'],
    ['0.0.0.0', 'unspecified ("this network")'],
    ['224.0.0.1', 'multicast'],
    ['239.255.255.250', 'multicast'],
    ['240.0.0.1', 'reserved'],
    ['255.255.255.255', 'reserved'],
    ['192.0.2.10', 'documentation'],
    ['198.18.0.1', 'benchmarking'],
    ['::1', 'loopback'],
    ['::', 'unspecified'],
    ['fe80::1', 'link-local'],
    ['FE80::1', 'link-local'],
    ['fe80::1%eth0', 'link-local'],
    ['fc00::1', 'unique local (private)'],
    ['fd12:3456::1', 'unique local (private)'],
    ['ff02::1', 'multicast'],
    ['2001:db8::1', 'documentation'],
    ['2002:7f00:1::1', '6to4 (embeds an IPv4 address)'],
    ['::ffff:127.0.0.1', 'loopback (IPv4 in IPv6)'],
    ['::ffff:7f00:1', 'loopback (IPv4 in IPv6)'],
    ['::ffff:10.0.0.1', 'private (IPv4 in IPv6)'],
    ['::ffff:169.254.169.254', 'link-local (cloud metadata) (IPv4 in IPv6)'],
    ['::127.0.0.1', 'loopback (IPv4 in IPv6)'],
    ['64:ff9b:1::1', 'local NAT64'],
    // Outside 2000::/3 (global unicast): the SIIT form that embeds 127.0.0.1, and unassigned space.
    ['::ffff:0:7f00:1', 'non-global (outside 2000::/3)'],
    ['5f00::1', 'non-global (outside 2000::/3)'],
    ['4000::1', 'non-global (outside 2000::/3)'],
  ])('blocks %s as %s', (ip, reason) => {
    expect(blockedReason(ip)).toBe(reason);
  });

  it.each(['8.8.8.8', '1.1.1.1', '172.32.0.1', '100.128.0.1', '2606:4700::1111', '::ffff:8.8.8.8', '64:ff9b::808:808'])(
    'lets the public address %s through',
    (ip) => {
      expect(blockedReason(ip)).toBeUndefined();
    },
  );

  // 64:ff9b::/96 is the well-known NAT64 prefix (RFC 6052): a NAT64 gateway (e.g. an AWS NAT gateway for an
  // IPv6-only subnet) forwards 64:ff9b::a.b.c.d to the embedded IPv4 address, private ones included.
  it.each([
    ['64:ff9b::7f00:1', 'loopback'],
    ['64:ff9b::a00:1', 'private'],
    ['64:ff9b::169.254.169.254', 'link-local (cloud metadata)'],
  ])('blocks %s, which NAT64 translates to a %s IPv4 address', (ip, v4reason) => {
    expect(blockedReason(ip)).toContain(v4reason);
  });

  it.each(['127.1', '2130706433', 'localhost', 'example.com', '', '1.2.3.4.5'])(
    'refuses %j as not an IP address (fails closed)',
    (text) => {
      expect(blockedReason(text)).toBe('not an IP address');
    },
  );
});

describe('v4ToBig and v6ToBig', () => {
  it('expand addresses to integers', () => {
    expect(v4ToBig('10.0.0.1')).toBe(0x0a000001n);
    expect(v6ToBig('::1')).toBe(1n);
    expect(v6ToBig('::')).toBe(0n);
    expect(v6ToBig('::ffff:127.0.0.1')).toBe(0xffff7f000001n);
    expect(v6ToBig('fe80::1%eth0')).toBe((0xfe80n << 112n) | 1n);
    expect(v6ToBig('1:2:3:4:5:6:7:8')).toBe(0x00010002000300040005000600070008n);
    expect(v6ToBig('1::8')).toBe((1n << 112n) | 8n);
  });
});

describe('Allowlist', () => {
  const allow = new Allowlist([' Hooks.Internal ', '10.0.0.0/8', '192.168.1.5', 'fd00::/8', '[::1]']);

  it('matches hosts case-insensitively, with or without brackets', () => {
    expect(allow.hasHost('hooks.internal')).toBe(true);
    expect(allow.hasHost('HOOKS.INTERNAL')).toBe(true);
    expect(allow.hasHost('[hooks.internal]')).toBe(true);
    expect(allow.hasHost('other.internal')).toBe(false);
    expect(allow.hasHost('sub.hooks.internal')).toBe(false);
  });

  it('matches addresses inside an IPv4 CIDR only', () => {
    expect(allow.hasAddress('10.0.0.1')).toBe(true);
    expect(allow.hasAddress('10.255.255.255')).toBe(true);
    expect(allow.hasAddress('11.0.0.1')).toBe(false);
    expect(allow.hasAddress('9.255.255.255')).toBe(false);
  });

  it('treats a bare IPv4 address as a /32', () => {
    expect(allow.hasAddress('192.168.1.5')).toBe(true);
    expect(allow.hasAddress('192.168.1.6')).toBe(false);
  });

  it('matches addresses inside an IPv6 CIDR only', () => {
    expect(allow.hasAddress('fd00::1')).toBe(true);
    expect(allow.hasAddress('fdff:ffff::1')).toBe(true);
    expect(allow.hasAddress('fc00::1')).toBe(false);
    expect(allow.hasAddress('fe80::1')).toBe(false);
  });

  it('treats a bracketed bare IPv6 address as a /128', () => {
    expect(allow.hasAddress('::1')).toBe(true);
    expect(allow.hasAddress('::2')).toBe(false);
  });

  it('does not let an IPv4 CIDR match an IPv6 address or a hostname', () => {
    expect(allow.hasAddress('::a00:1')).toBe(false);
    expect(allow.hasAddress('hooks.internal')).toBe(false);
  });

  it('allows nothing when empty', () => {
    const none = new Allowlist([]);
    expect(none.hasHost('localhost')).toBe(false);
    expect(none.hasAddress('127.0.0.1')).toBe(false);
  });

  it('allows everything in a /0, for the operator who asks for it', () => {
    expect(new Allowlist(['0.0.0.0/0']).hasAddress('127.0.0.1')).toBe(true);
  });

  it.each([
    ['a prefix longer than 32 bits', '10.0.0.0/33', 'allowlist entry 10.0.0.0/33: bad prefix'],
    ['a prefix longer than 128 bits', 'fd00::/129', 'allowlist entry fd00::/129: bad prefix'],
    ['a non-numeric prefix', '10.0.0.0/x', 'allowlist entry 10.0.0.0/x: bad prefix'],
    ['a negative prefix', '10.0.0.0/-1', 'allowlist entry 10.0.0.0/-1: bad prefix'],
    ['a CIDR on a hostname', 'hooks.internal/8', 'allowlist entry hooks.internal/8: a CIDR needs an IP address'],
  ])('rejects %s with a TypeError', (_name, entry, message) => {
    expect(() => new Allowlist([entry])).toThrow(new TypeError(message));
  });

  // A trailing slash (a typo for "10.0.0.0/8") must not silently become 0.0.0.0/0 and exempt every IPv4 address.
  it('rejects an empty prefix instead of reading it as /0', () => {
    expect(() => new Allowlist(['10.0.0.0/'])).toThrow(TypeError);
  });
});
