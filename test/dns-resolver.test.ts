import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Slots } from '../src/core/slots.js';
import { Allowlist } from '../src/delivery/address-policy.js';
import { dnsResolver, parseHosts } from '../src/delivery/dns-resolver.js';
import { EndpointGuard } from '../src/delivery/endpoint-guard.js';
import { DnsServer } from './support/dns-server.js';
import { topicSubscription } from './support/fhir-client.js';
import { inProcessBroker, TOKENS } from './support/in-process.js';

/**
 * Endpoint names a client chose are resolved with c-ares against a real DNS server (a UDP one on
 * 127.0.0.1 that the test controls), after the hosts file: not on libuv's thread pool, so names
 * whose DNS never answers hold nothing that other clients' names, or file access, need.
 */

const RECORDS = {
  'public.test': ['93.184.216.34', '2606:2800:220:1:248:1893:25c8:1946'],
  'inside.test': ['10.0.0.5'],
  'v6only.test': ['2001:db8::1'],
};

describe('the resolver of client-chosen endpoint names', () => {
  let dns: DnsServer;
  let dir: string;
  let hostsFile: string;

  beforeAll(async () => {
    dns = await DnsServer.start(RECORDS);
    dir = mkdtempSync(join(tmpdir(), 'fsb-dns-'));
    hostsFile = join(dir, 'hosts');
    writeFileSync(
      hostsFile,
      ['# comment', '127.0.0.1 localhost loopback.test # trailing', '::1 localhost', '10.1.2.3 Listed.Test', ''].join(
        '\n',
      ),
    );
  });

  afterAll(() => {
    dns?.close();
    rmSync(dir, { recursive: true, force: true });
  });

  const resolver = (timeoutMs = 300, maxInFlight?: number) =>
    dnsResolver({ servers: [dns.address], hostsFile, timeoutMs, tries: 1, ...(maxInFlight ? { maxInFlight } : {}) });

  it('answers A and AAAA records from DNS, and the hosts file first (any case, a trailing dot)', async () => {
    const resolve = resolver();
    expect(await resolve('public.test')).toEqual([
      { address: '93.184.216.34', family: 4 },
      { address: '2606:2800:220:1:248:1893:25c8:1946', family: 6 },
    ]);
    expect(await resolve('v6only.test')).toEqual([{ address: '2001:db8::1', family: 6 }]);
    expect(await resolve('LISTED.test.')).toEqual([{ address: '10.1.2.3', family: 4 }]);
    expect(await resolve('localhost')).toEqual([
      { address: '127.0.0.1', family: 4 },
      { address: '::1', family: 6 },
    ]);
    // The hosts file answered those: DNS was asked for the others only.
    expect(dns.queries.filter((q) => q.includes('listed') || q.includes('localhost'))).toEqual([]);
    await expect(resolve('unknown.test')).rejects.toMatchObject({ code: 'ENOTFOUND' });
  });

  it('reads hosts lines as getaddrinfo does: comments, aliases, both families, nothing else', () => {
    const hosts = parseHosts('# x\n 192.0.2.1\tA.test  b.test # c.test\nnot-an-address d.test\nfe80::1%lo e.test\n');
    expect([...hosts.entries()]).toEqual([
      ['a.test', [{ address: '192.0.2.1', family: 4 }]],
      ['b.test', [{ address: '192.0.2.1', family: 4 }]],
    ]);
  });

  it('gives up on a name whose DNS does not answer, and many such names hold nothing else up', async () => {
    const resolve = resolver(1_000);
    const settled: string[] = [];
    const hanging = Array.from({ length: 16 }, (_, i) =>
      resolve(`n${i}.hang.test`).then(
        () => settled.push('hang answered'),
        (err: NodeJS.ErrnoException) => settled.push(`hang ${err.code}`),
      ),
    );
    // While the sixteen wait for an answer: the thread pool (a file read) and another name.
    await readFile(hostsFile, 'utf8');
    settled.push('file read');
    await resolve('public.test');
    settled.push('public.test');
    await Promise.all(hanging);
    expect(settled).toEqual(['file read', 'public.test', ...Array<string>(16).fill('hang ETIMEOUT')]);
  });

  it('refuses, through the guard, a name that resolves to a private address, saying only what kind', async () => {
    const guard = new EndpointGuard(new Allowlist([]), resolver());
    await expect(guard.checkEndpoint('https://inside.test/hook')).rejects.toThrow(
      'channel.endpoint inside.test: resolves to a private address',
    );
    expect((await guard.checkEndpoint('https://public.test/hook')).host).toBe('public.test');
  });

  it("one client's registrations of names that hang do not hold up another client's", async () => {
    // Room for five names over DNS at once: Alice's checks go four at a time (the registry's cap
    // per client), so the fifth is there for Bob; without that cap her eight would take all five.
    const t = await inProcessBroker({}, { resolver: resolver(1_000, 5) });
    try {
      const order: string[] = [];
      const alice = Array.from({ length: 8 }, (_, i) =>
        t
          .call('POST', '/fhir/Subscription', topicSubscription('patient-change', `https://a${i}.hang.test/x`))
          .then((res) => order.push(`alice ${res.status}`)),
      );
      const bob = await t.call(
        'POST',
        '/fhir/Subscription',
        topicSubscription('patient-change', 'https://inside.test/x'),
        TOKENS.bob,
      );
      order.push(`bob ${bob.status}`);
      await Promise.all(alice);
      // Bob's answer (the guard's own refusal) came while Alice's eight still waited for DNS.
      expect(order).toEqual(['bob 422', ...Array<string>(8).fill('alice 422')]);
      expect(JSON.stringify(bob.body)).toContain('resolves to a private address');
    } finally {
      await t.broker.close(0);
    }
  });
});

describe('Slots', () => {
  it('runs at most its number of tasks at once, the rest in order, and says when it is idle', async () => {
    const slots = new Slots(2);
    const log: string[] = [];
    let running = 0;
    let peak = 0;
    const releases: (() => void)[] = [];
    const task = (name: string) =>
      slots.run(async () => {
        running++;
        peak = Math.max(peak, running);
        log.push(`start ${name}`);
        await new Promise<void>((resolve) => releases.push(resolve));
        running--;
        log.push(`end ${name}`);
      });
    const all = ['a', 'b', 'c', 'd'].map(task);
    expect(slots.idle).toBe(false);
    while (log.length < 8) {
      await new Promise((r) => setImmediate(r));
      releases.shift()?.();
    }
    await Promise.all(all);
    expect(peak).toBe(2);
    expect(log.slice(0, 2)).toEqual(['start a', 'start b']);
    expect(log.filter((l) => l.startsWith('start'))).toEqual(['start a', 'start b', 'start c', 'start d']);
    expect(slots.idle).toBe(true);
    // A failed task frees its slot too.
    await expect(slots.run(() => Promise.reject(new Error('no')))).rejects.toThrow('no');
    expect(slots.idle).toBe(true);
  });
});
