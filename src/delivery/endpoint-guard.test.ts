import type { LookupAddress } from 'node:dns';
import { describe, expect, it } from 'vitest';
import { BrokerError, type ErrorCode } from '../core/errors.js';
import { Allowlist } from './address-policy.js';
import { EndpointGuard, EndpointRefusedError, EndpointUnresolvedError, type Resolver } from './endpoint-guard.js';

const PUBLIC_V4: LookupAddress = { address: '93.184.216.34', family: 4 };
const PUBLIC_V6: LookupAddress = { address: '2606:2800:220:1:248:1893:25c8:1946', family: 6 };

const DNS: Readonly<Record<string, readonly LookupAddress[]>> = {
  'hooks.example.com': [PUBLIC_V4, PUBLIC_V6],
  'v6only.example.com': [PUBLIC_V6],
  'internal.example.com': [{ address: '10.0.0.7', family: 4 }],
  'metadata.example.com': [{ address: '169.254.169.254', family: 4 }],
  'rebind.example.com': [PUBLIC_V4, { address: '127.0.0.1', family: 4 }],
  'mapped.example.com': [{ address: '::ffff:192.168.0.1', family: 6 }],
  'empty.example.com': [],
  'hooks.internal': [{ address: '10.9.9.9', family: 4 }],
};

/** The one injected part: answers from the table above, ENOTFOUND otherwise, and records every question. */
function fakeResolver(): { resolve: Resolver; asked: string[] } {
  const asked: string[] = [];
  const resolve: Resolver = async (host) => {
    asked.push(host);
    const answer = DNS[host];
    if (answer === undefined) throw Object.assign(new Error(`getaddrinfo ENOTFOUND ${host}`), { code: 'ENOTFOUND' });
    return answer;
  };
  return { resolve, asked };
}

function guard(allow: readonly string[] = []): { guard: EndpointGuard; asked: string[] } {
  const { resolve, asked } = fakeResolver();
  return { guard: new EndpointGuard(new Allowlist(allow), resolve), asked };
}

async function refusal(g: EndpointGuard, endpoint: string): Promise<{ code: ErrorCode; message: string }> {
  try {
    await g.checkEndpoint(endpoint);
  } catch (err) {
    if (!(err instanceof BrokerError)) throw err;
    expect(err.expression).toBe('Subscription.channel.endpoint');
    return { code: err.code, message: err.message };
  }
  throw new Error(`expected ${endpoint} to be refused`);
}

type Answer = { err: Error | null; address: string | LookupAddress[]; family?: number };

/** `EndpointGuard.lookup`, the socket's resolver, as a promise of what it called back with. */
function lookup(g: EndpointGuard, host: string, options: { all?: boolean } | number | undefined): Promise<Answer> {
  return new Promise((resolve) => {
    g.lookup(host, options, (err, address, family) => resolve({ err, address, family }));
  });
}

describe('EndpointGuard.checkEndpoint', () => {
  it('accepts an https endpoint whose every address is public', async () => {
    const { guard: g, asked } = guard();
    const url = await g.checkEndpoint('https://hooks.example.com/fhir/notify?x=1');
    expect(url.href).toBe('https://hooks.example.com/fhir/notify?x=1');
    expect(asked).toEqual(['hooks.example.com']);
  });

  it('accepts a public IP literal without asking DNS', async () => {
    const { guard: g, asked } = guard();
    expect((await g.checkEndpoint('https://8.8.8.8/hook')).hostname).toBe('8.8.8.8');
    expect((await g.checkEndpoint('https://[2606:4700::1111]/hook')).hostname).toBe('[2606:4700::1111]');
    expect(asked).toEqual([]);
  });

  it('refuses plain http for a host that is not allow-listed', async () => {
    expect(await refusal(guard().guard, 'http://hooks.example.com/x')).toEqual({
      code: 'INVALID_ENDPOINT',
      message: 'channel.endpoint must be https; hooks.example.com is not on BROKER_ENDPOINT_ALLOWLIST',
    });
  });

  it.each(['ftp://hooks.example.com/x', 'file:///etc/passwd', 'ws://hooks.example.com/x', 'javascript:alert(1)'])(
    'refuses the non-http scheme of %s',
    async (endpoint) => {
      expect((await refusal(guard().guard, endpoint)).code).toBe('INVALID_ENDPOINT');
    },
  );

  it.each(['hooks.example.com/x', '/relative/path', '', 'https://'])(
    'refuses %j, which is not an absolute URL',
    async (endpoint) => {
      expect((await refusal(guard().guard, endpoint)).code).toBe('INVALID_ENDPOINT');
    },
  );

  it('does not quote an endpoint that is not a URL back (it may carry a token)', async () => {
    expect(await refusal(guard().guard, 'hooks.example.com/x?token=s3cret')).toEqual({
      code: 'INVALID_ENDPOINT',
      message: 'channel.endpoint is not an absolute URL (https://host/path)',
    });
  });

  it('refuses credentials in the URL', async () => {
    expect(await refusal(guard().guard, 'https://user:secret@hooks.example.com/x')).toEqual({
      code: 'INVALID_ENDPOINT',
      message: 'channel.endpoint must not carry credentials; use channel.header',
    });
    expect((await refusal(guard().guard, 'https://user@hooks.example.com/x')).code).toBe('INVALID_ENDPOINT');
  });

  it.each([
    ['https://127.0.0.1/x', '127.0.0.1 is a loopback address'],
    ['https://10.1.2.3/x', '10.1.2.3 is a private address'],
    ['https://169.254.169.254/latest/meta-data/', '169.254.169.254 is a link-local (cloud metadata) address'],
    ['https://[::1]/x', '::1 is a loopback address'],
    ['https://[fe80::1]/x', 'fe80::1 is a link-local address'],
    ['https://[::ffff:127.0.0.1]/x', '::ffff:7f00:1 is a loopback (IPv4 in IPv6) address'],
    ['https://0.0.0.0/x', '0.0.0.0 is a unspecified ("this network") address'],
    // The WHATWG URL parser normalises these spellings to 127.0.0.1 before the guard looks at them.
    ['https://2130706433/x', '127.0.0.1 is a loopback address'],
    ['https://0x7f.1/x', '127.0.0.1 is a loopback address'],
    ['https://127.1/x', '127.0.0.1 is a loopback address'],
  ])('refuses the private literal in %s with ENDPOINT_FORBIDDEN', async (endpoint, why) => {
    const { guard: g, asked } = guard();
    const host = new URL(endpoint).hostname.replace(/^\[|\]$/g, '');
    expect(await refusal(g, endpoint)).toEqual({
      code: 'ENDPOINT_FORBIDDEN',
      message: `channel.endpoint ${host}: ${why}`,
    });
    expect(asked).toEqual([]);
  });

  it.each([
    ['internal.example.com', 'resolves to a private address'],
    ['metadata.example.com', 'resolves to a link-local (cloud metadata) address'],
    ['mapped.example.com', 'resolves to a private (IPv4 in IPv6) address'],
  ])('refuses %s, which resolves to a private address, without naming the address', async (host, why) => {
    expect(await refusal(guard().guard, `https://${host}/x`)).toEqual({
      code: 'ENDPOINT_FORBIDDEN',
      message: `channel.endpoint ${host}: ${why}`,
    });
  });

  it('refuses a host when any one of its answers is private', async () => {
    expect(await refusal(guard().guard, 'https://rebind.example.com/x')).toEqual({
      code: 'ENDPOINT_FORBIDDEN',
      message: 'channel.endpoint rebind.example.com: resolves to a loopback address',
    });
  });

  it('refuses a host that does not resolve, naming the DNS error', async () => {
    expect(await refusal(guard().guard, 'https://nxdomain.example.com/x')).toEqual({
      code: 'ENDPOINT_FORBIDDEN',
      message: 'channel.endpoint nxdomain.example.com: does not resolve (ENOTFOUND)',
    });
  });

  it('refuses a host with an empty answer', async () => {
    expect(await refusal(guard().guard, 'https://empty.example.com/x')).toEqual({
      code: 'ENDPOINT_FORBIDDEN',
      message: 'channel.endpoint empty.example.com: does not resolve',
    });
  });

  it('accepts an allow-listed host over http without resolving it', async () => {
    const { guard: g, asked } = guard(['hooks.internal']);
    expect((await g.checkEndpoint('http://hooks.internal:8080/x')).href).toBe('http://hooks.internal:8080/x');
    expect(asked).toEqual([]);
  });

  it('accepts an allow-listed host named in another case', async () => {
    const { guard: g } = guard(['Hooks.Internal']);
    expect((await g.checkEndpoint('https://HOOKS.internal/x')).hostname).toBe('hooks.internal');
  });

  it('accepts a private literal inside an allow-listed CIDR, over http too', async () => {
    const { guard: g } = guard(['10.0.0.0/8', 'fd00::/8']);
    expect((await g.checkEndpoint('http://10.2.3.4:9000/hook')).host).toBe('10.2.3.4:9000');
    expect((await g.checkEndpoint('https://[fd00::5]/hook')).hostname).toBe('[fd00::5]');
  });

  it('accepts a host whose private answers all fall inside an allow-listed CIDR, over https', async () => {
    const { guard: g } = guard(['10.0.0.0/8']);
    expect((await g.checkEndpoint('https://internal.example.com/x')).hostname).toBe('internal.example.com');
    expect((await refusal(g, 'http://internal.example.com/x')).code).toBe('INVALID_ENDPOINT');
  });

  it('still refuses other private ranges when one CIDR is allow-listed', async () => {
    const { guard: g } = guard(['10.0.0.0/8']);
    expect((await refusal(g, 'https://192.168.0.1/x')).code).toBe('ENDPOINT_FORBIDDEN');
  });
});

describe('EndpointGuard.lookup', () => {
  it('yields the first vetted address and its family', async () => {
    expect(await lookup(guard().guard, 'hooks.example.com', {})).toEqual({
      err: null,
      address: '93.184.216.34',
      family: 4,
    });
    expect(await lookup(guard().guard, 'v6only.example.com', undefined)).toEqual({
      err: null,
      address: PUBLIC_V6.address,
      family: 6,
    });
  });

  it('accepts the numeric family form of the options', async () => {
    expect(await lookup(guard().guard, 'hooks.example.com', 4)).toEqual({
      err: null,
      address: '93.184.216.34',
      family: 4,
    });
  });

  it('yields every vetted address with {all: true}', async () => {
    expect(await lookup(guard().guard, 'hooks.example.com', { all: true })).toEqual({
      err: null,
      address: [PUBLIC_V4, PUBLIC_V6],
      family: undefined,
    });
  });

  it('passes a literal through, with brackets removed', async () => {
    expect(await lookup(guard().guard, '[2606:4700::1111]', { all: true })).toEqual({
      err: null,
      address: [{ address: '2606:4700::1111', family: 6 }],
      family: undefined,
    });
  });

  it('fails a private answer with EndpointRefusedError and an empty address', async () => {
    const single = await lookup(guard().guard, 'rebind.example.com', {});
    expect(single.err).toBeInstanceOf(EndpointRefusedError);
    expect(single.err?.message).toBe('resolves to a loopback address');
    expect(single.address).toBe('');
    expect(single.family).toBe(0);

    const all = await lookup(guard().guard, 'rebind.example.com', { all: true });
    expect(all.err).toBeInstanceOf(EndpointRefusedError);
    expect(all.address).toEqual([]);
  });

  it('fails a private literal without asking DNS', async () => {
    const { guard: g, asked } = guard();
    const answer = await lookup(g, '[::1]', { all: true });
    expect(answer.err).toBeInstanceOf(EndpointRefusedError);
    expect(asked).toEqual([]);
  });

  it('fails a name that does not resolve as unresolved, not refused (a DNS outage passes)', async () => {
    const answer = await lookup(guard().guard, 'nxdomain.example.com', {});
    expect(answer.err).toBeInstanceOf(EndpointUnresolvedError);
    expect(answer.err).not.toBeInstanceOf(EndpointRefusedError);
    expect(answer.err?.message).toBe('does not resolve (ENOTFOUND)');
    const empty = await lookup(guard().guard, 'empty.example.com', { all: true });
    expect(empty.err).toBeInstanceOf(EndpointUnresolvedError);
  });

  it('resolves an allow-listed host even when it answers with a private address', async () => {
    expect(await lookup(guard(['hooks.internal']).guard, 'hooks.internal', { all: true })).toEqual({
      err: null,
      address: [{ address: '10.9.9.9', family: 4 }],
      family: undefined,
    });
  });
});

describe('EndpointGuard: a name whose DNS hangs', () => {
  /** A resolver whose `hang.example.com` answers only when the test says; every question recorded. */
  function hangingResolver(): { resolve: Resolver; asked: string[]; answer: () => void; fail: () => void } {
    const asked: string[] = [];
    const waiting: { ok: () => void; err: () => void }[] = [];
    const resolve: Resolver = (host) => {
      asked.push(host);
      if (host !== 'hang.example.com') return Promise.resolve([PUBLIC_V4]);
      return new Promise((ok, err) =>
        waiting.push({
          ok: () => ok([PUBLIC_V6]),
          err: () => err(Object.assign(new Error('getaddrinfo EAI_AGAIN hang.example.com'), { code: 'EAI_AGAIN' })),
        }),
      );
    };
    return {
      resolve,
      asked,
      answer: () => {
        for (const w of waiting.splice(0)) w.ok();
      },
      fail: () => {
        for (const w of waiting.splice(0)) w.err();
      },
    };
  }

  it('asks once for every lookup of that name meanwhile, and answers them all', async () => {
    const dns = hangingResolver();
    const g = new EndpointGuard(new Allowlist([]), dns.resolve);
    const answers = Array.from({ length: 32 }, () => g.vet('hang.example.com'));
    // Another name is not held behind it.
    expect(await g.vet('hooks.example.com')).toEqual([PUBLIC_V4]);
    expect(dns.asked).toEqual(['hang.example.com', 'hooks.example.com']);
    dns.answer();
    for (const a of await Promise.all(answers)) expect(a).toEqual([PUBLIC_V6]);
    // Settled: the next lookup asks again (nothing is cached).
    dns.answer();
    const again = g.vet('hang.example.com');
    dns.answer();
    expect(await again).toEqual([PUBLIC_V6]);
    expect(dns.asked.filter((h) => h === 'hang.example.com')).toHaveLength(2);
  });

  it('shares a failure too, and asks again afterwards', async () => {
    const dns = hangingResolver();
    const g = new EndpointGuard(new Allowlist([]), dns.resolve);
    const answers = [g.vet('hang.example.com'), g.vet('hang.example.com')].map((p) => p.catch((err: unknown) => err));
    dns.fail();
    for (const err of await Promise.all(answers)) expect((err as Error).message).toBe('does not resolve (EAI_AGAIN)');
    const next = g.vet('hang.example.com');
    dns.answer();
    expect(await next).toEqual([PUBLIC_V6]);
    expect(dns.asked).toEqual(['hang.example.com', 'hang.example.com']);
  });

  it('gives up after the timeout as unresolved (ETIMEOUT) without asking again while the first question hangs', async () => {
    const dns = hangingResolver();
    const g = new EndpointGuard(new Allowlist([]), dns.resolve, { resolveTimeoutMs: 50 });
    const first = await lookup(g, 'hang.example.com', {});
    expect(first.err).toBeInstanceOf(EndpointUnresolvedError);
    expect(first.err?.message).toBe('does not resolve (ETIMEOUT)');
    // Registration says so too, as a 422.
    expect(await refusal(g, 'https://hang.example.com/hook')).toEqual({
      code: 'ENDPOINT_FORBIDDEN',
      message: 'channel.endpoint hang.example.com: does not resolve (ETIMEOUT)',
    });
    expect(dns.asked).toEqual(['hang.example.com']);
    // Once the question is answered, the next lookup asks anew and gets the answer.
    dns.answer();
    await new Promise((resolve) => setImmediate(resolve));
    const later = g.vet('hang.example.com');
    dns.answer();
    expect(await later).toEqual([PUBLIC_V6]);
    expect(dns.asked).toEqual(['hang.example.com', 'hang.example.com']);
  });
});
