import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { type AddressInfo, createServer as createNetServer, type Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { Allowlist } from './address-policy.js';
import { EndpointGuard } from './endpoint-guard.js';
import { RestHookSender, RunStop, type SendResult, sendInOrder, type WebhookRequest } from './rest-hook-sender.js';

/** A guard that counts what it is asked to vet. */
class CountingGuard extends EndpointGuard {
  vetted: string[] = [];
  override async vet(host: string) {
    this.vetted.push(host);
    return super.vet(host);
  }
}

let server: Server | undefined;
let sender: RestHookSender | undefined;

afterEach(async () => {
  await sender?.close();
  sender = undefined;
  server?.closeAllConnections();
  await new Promise((resolve) => (server ? server.close(resolve) : resolve(undefined)));
  server = undefined;
});

/** A receiver on 127.0.0.1 answering each request with `answer` once its body is in. */
async function receiver(answer: (res: ServerResponse, req: IncomingMessage) => void): Promise<string> {
  server = createServer((req, res) => {
    req.resume();
    req.on('end', () => answer(res, req));
  });
  await new Promise<void>((resolve) => server?.listen(0, '127.0.0.1', resolve));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`;
}

function request(endpoint: string, timeoutMs = 2000): WebhookRequest {
  return {
    endpoint,
    headers: [],
    contentType: 'application/fhir+json',
    body: '{}',
    webhookId: 'w1',
    secrets: [],
    timeoutMs,
  };
}

describe('RestHookSender', () => {
  it('vets an IP-literal endpoint before its first attempt, not on every attempt', async () => {
    const endpoint = await receiver((res) => res.writeHead(204).end());
    const guard = new CountingGuard(new Allowlist(['127.0.0.1']));
    sender = new RestHookSender(guard, Date);
    for (let i = 0; i < 3; i++) expect(await sender.send(request(endpoint))).toEqual({ ok: true, status: 204 });
    expect(guard.vetted).toEqual(['127.0.0.1']);
  });

  it('sends its own User-Agent unless the subscription names one, and the subscription’s headers as given', async () => {
    const seen: IncomingMessage['headers'][] = [];
    const endpoint = await receiver((res, req) => {
      seen.push(req.headers);
      res.writeHead(204).end();
    });
    sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date, { userAgent: 'broker-ua' });
    await sender.send(request(endpoint));
    await sender.send({ ...request(endpoint), headers: ['User-Agent: my-app/2', 'Authorization: Bearer t'] });
    expect(seen.map((h) => [h['user-agent'], h.authorization])).toEqual([
      ['broker-ua', undefined],
      ['my-app/2', 'Bearer t'],
    ]);
  });

  it('refuses a forbidden IP literal on every attempt, permanently, without connecting', async () => {
    let reached = 0;
    const endpoint = await receiver((res) => {
      reached++;
      res.writeHead(204).end();
    });
    const guard = new CountingGuard(new Allowlist([]));
    sender = new RestHookSender(guard, Date);
    for (let i = 0; i < 2; i++) {
      expect(await sender.send(request(endpoint))).toEqual({
        ok: false,
        error: 'endpoint refused: 127.0.0.1 is a loopback address',
        permanent: true,
      });
    }
    expect(guard.vetted).toEqual(['127.0.0.1', '127.0.0.1']);
    expect(reached).toBe(0);
  });

  it('refuses plain http to a host off the allow-list on every attempt, though its address is allowed', async () => {
    // Registered while hooks.example was allow-listed; a restart took it off. Its address
    // (127.0.0.1) still is, so only the scheme rule refuses it: never called in clear text.
    let reached = 0;
    const endpoint = await receiver((res) => {
      reached++;
      res.writeHead(204).end();
    });
    const port = new URL(endpoint).port;
    const guard = new EndpointGuard(new Allowlist(['127.0.0.1']), async () => [{ address: '127.0.0.1', family: 4 }]);
    sender = new RestHookSender(guard, Date);
    for (let i = 0; i < 2; i++) {
      expect(await sender.send(request(`http://hooks.example:${port}/hook`))).toEqual({
        ok: false,
        error: 'endpoint refused: must be https; hooks.example is not on BROKER_ENDPOINT_ALLOWLIST',
        permanent: true,
      });
    }
    expect(reached).toBe(0);
    // The same receiver by its allow-listed address is called.
    expect(await sender.send(request(endpoint))).toEqual({ ok: true, status: 204 });
    expect(reached).toBe(1);
  });

  it('fails a name that does not resolve without calling it permanent, and sends once it resolves', async () => {
    const endpoint = await receiver((res) => res.writeHead(204).end());
    let down = true;
    // The name is allow-listed (as plain http to it needs), and its lookups are still checked.
    const guard = new EndpointGuard(new Allowlist(['127.0.0.1', 'hooks.example.com']), async () => {
      if (down) throw Object.assign(new Error('getaddrinfo EAI_AGAIN hooks.example.com'), { code: 'EAI_AGAIN' });
      return [{ address: '127.0.0.1', family: 4 }];
    });
    sender = new RestHookSender(guard, Date);
    const named = endpoint.replace('127.0.0.1', 'hooks.example.com');
    expect(await sender.send(request(named))).toEqual({ ok: false, error: 'endpoint does not resolve (EAI_AGAIN)' });
    down = false;
    expect(await sender.send(request(named))).toEqual({ ok: true, status: 204 });
  });

  it('opens 32 connections to a name whose DNS hangs on one question, and sends to another name meanwhile', async () => {
    const endpoint = await receiver((res) => res.writeHead(204).end());
    const asked: string[] = [];
    const guard = new EndpointGuard(
      new Allowlist(['127.0.0.1', 'hang.example.com', 'hooks.example.com']),
      (host) => {
        asked.push(host);
        // hang.example.com: no answer, ever (a DNS server that does not reply).
        return host === 'hang.example.com'
          ? new Promise(() => {})
          : Promise.resolve([{ address: '127.0.0.1', family: 4 }]);
      },
      { resolveTimeoutMs: 300 },
    );
    sender = new RestHookSender(guard, Date, { connections: 32 });
    const hanging = Array.from({ length: 32 }, () =>
      sender?.send(request(endpoint.replace('127.0.0.1', 'hang.example.com'))),
    );
    expect(await sender.send(request(endpoint.replace('127.0.0.1', 'hooks.example.com')))).toEqual({
      ok: true,
      status: 204,
    });
    for (const result of await Promise.all(hanging)) {
      expect(result).toEqual({ ok: false, error: 'endpoint does not resolve (ETIMEOUT)' });
    }
    // Each connection asked the socket's resolver; one question went to DNS.
    expect(asked).toEqual(['hang.example.com', 'hooks.example.com']);
  });

  it('answers at once for an empty 200, and times out a body that never ends', async () => {
    const empty = await receiver((res) => res.writeHead(200, { 'content-length': '0' }).end());
    sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
    expect(await sender.send(request(empty))).toEqual({ ok: true, status: 200 });
    await sender.close();
    server?.closeAllConnections();
    await new Promise((resolve) => server?.close(resolve));

    const endless = await receiver((res) => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('still going');
    });
    sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
    const started = Date.now();
    // The answer's status came in time: the attempt counts as delivered once the body is given up on.
    expect(await sender.send(request(endless, 300))).toEqual({ ok: true, status: 200 });
    expect(Date.now() - started).toBeGreaterThanOrEqual(250);
  });

  it('ends an attempt at its timeout however many interim (1xx) answers come, and takes one before a final answer', async () => {
    // An endpoint that reads the request, then sends `102 Processing` every 100 ms (undici starts
    // its headers timeout over at each), or, for /early, one `103 Early Hints` and then a 204.
    const sockets = new Set<Socket>();
    const endpoint = createNetServer((socket) => {
      sockets.add(socket);
      socket.on('error', () => undefined);
      socket.once('data', (chunk: Buffer) => {
        if (chunk.toString('latin1').startsWith('POST /early ')) {
          socket.write('HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n');
          setTimeout(() => socket.write('HTTP/1.1 204 No Content\r\n\r\n'), 50);
          return;
        }
        const timer = setInterval(() => socket.write('HTTP/1.1 102 Processing\r\n\r\n'), 100);
        socket.on('close', () => clearInterval(timer));
      });
    });
    await new Promise<void>((resolve) => endpoint.listen(0, '127.0.0.1', resolve));
    const base = `http://127.0.0.1:${(endpoint.address() as AddressInfo).port}`;
    try {
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
      const started = Date.now();
      expect(await sender.send(request(`${base}/hook`, 500))).toEqual({ ok: false, error: 'timeout after 500 ms' });
      const took = Date.now() - started;
      expect(took).toBeGreaterThanOrEqual(450);
      // Before, undici's timer started over at every 102 and the attempt never ended.
      expect(took).toBeLessThan(3_000);
      expect(await sender.send(request(`${base}/early`, 500))).toEqual({ ok: true, status: 204 });
    } finally {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => endpoint.close(resolve));
    }
  });

  /** A raw endpoint on 127.0.0.1: `onRequest` gets each request's first bytes and its socket's request count. */
  async function rawEndpoint(onRequest: (socket: Socket, head: string, nth: number) => void) {
    const sockets = new Set<Socket>();
    let connections = 0;
    let requests = 0;
    const endpoint = createNetServer((socket) => {
      connections++;
      sockets.add(socket);
      socket.on('error', () => undefined);
      let nth = 0;
      socket.on('data', (chunk: Buffer) => {
        const head = chunk.toString('latin1');
        if (!/^[A-Z]+ \//.test(head)) return;
        requests++;
        onRequest(socket, head, ++nth);
      });
    });
    await new Promise<void>((resolve) => endpoint.listen(0, '127.0.0.1', resolve));
    return {
      url: `http://127.0.0.1:${(endpoint.address() as AddressInfo).port}`,
      connections: () => connections,
      requests: () => requests,
      close: async () => {
        for (const socket of sockets) socket.destroy();
        await new Promise((resolve) => endpoint.close(resolve));
      },
    };
  }

  it.each([
    ['closes', (socket: Socket) => socket.end()],
    ['resets', (socket: Socket) => socket.resetAndDestroy()],
  ])(
    'sends again on a new connection when the endpoint %s the kept-alive socket the request went out on',
    async (_how, drop) => {
      // Each socket answers its first request; a second one on it meets the endpoint closing it
      // (its idle timeout won the race): the endpoint never took that request.
      const endpoint = await rawEndpoint((socket, _head, nth) => {
        if (nth === 1) socket.write('HTTP/1.1 204 No Content\r\n\r\n');
        else drop(socket);
      });
      try {
        sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
        expect(await sender.send(request(`${endpoint.url}/hook`))).toEqual({ ok: true, status: 204 });
        // The first socket back in the pool, idle.
        await new Promise((resolve) => setTimeout(resolve, 50));
        expect(await sender.send(request(`${endpoint.url}/hook`))).toEqual({ ok: true, status: 204 });
        // It went out on the kept-alive socket first, then on a new one.
        expect([endpoint.connections(), endpoint.requests()]).toEqual([2, 3]);
      } finally {
        await endpoint.close();
      }
    },
  );

  it('gives a request queued for a connection its whole timeout after an interim answer', async () => {
    // One connection: the second request waits ~600 ms for it, then gets `102` at once and its
    // 204 400 ms later, within its 700 ms timeout counted from the wire (not from the call).
    const endpoint = await rawEndpoint((socket, head) => {
      if (head.startsWith('POST /first ')) {
        setTimeout(() => socket.write('HTTP/1.1 204 No Content\r\n\r\n'), 600);
        return;
      }
      socket.write('HTTP/1.1 102 Processing\r\n\r\n');
      setTimeout(() => socket.write('HTTP/1.1 204 No Content\r\n\r\n'), 400);
    });
    try {
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date, { connections: 1 });
      const [first, second] = await Promise.all([
        sender.send(request(`${endpoint.url}/first`, 700)),
        sender.send(request(`${endpoint.url}/second`, 700)),
      ]);
      expect([first, second]).toEqual([
        { ok: true, status: 204 },
        { ok: true, status: 204 },
      ]);
    } finally {
      await endpoint.close();
    }
  });

  it('stops reading a slow body once the timeout from the call has run out: the attempt stays within it', async () => {
    // The answer's head comes at 600 ms, then a chunked body that never ends.
    const endpoint = await rawEndpoint((socket) => {
      setTimeout(() => {
        socket.write('HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n');
        const timer = setInterval(() => socket.write('1\r\nx\r\n'), 50);
        socket.on('close', () => clearInterval(timer));
      }, 600);
    });
    try {
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
      const started = performance.now();
      expect(await sender.send(request(`${endpoint.url}/hook`, 1_000))).toEqual({
        ok: false,
        status: 503,
        error: 'HTTP 503',
      });
      // Before, the body had a whole timeout of its own after the head: ~1.6 s.
      expect(performance.now() - started).toBeLessThan(1_400);
    } finally {
      await endpoint.close();
    }
  });

  it('says a connect that timed out is the connect timeout, not the subscription timeout', async () => {
    // https to a socket that never answers the TLS handshake.
    const endpoint = await rawEndpoint(() => undefined);
    try {
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date, { connectTimeoutMs: 300 });
      const url = endpoint.url.replace('http:', 'https:');
      expect(await sender.send(request(`${url}/hook`, 5_000))).toEqual({
        ok: false,
        error: 'connect timeout after 300 ms',
      });
    } finally {
      await endpoint.close();
    }
  });

  describe('sendInOrder', () => {
    /**
     * A receiver recording webhook-ids in arrival order and the most requests it held at once;
     * `onRequest` runs at each arrival, and each answer (`status`) comes 5 ms later.
     */
    async function orderedReceiver(status: (id: string) => number, onRequest: () => void = () => undefined) {
      const seen: string[] = [];
      let held = 0;
      let peak = 0;
      const endpoint = await receiver((res, req) => {
        held++;
        peak = Math.max(peak, held);
        const id = String(req.headers['webhook-id']);
        seen.push(id);
        onRequest();
        setTimeout(() => {
          held--;
          res.writeHead(status(id)).end();
        }, 5);
      });
      return { endpoint, seen, peak: () => peak };
    }
    const run = (endpoint: string, n: number) =>
      Array.from({ length: n }, (_, i) => ({ ...request(endpoint), webhookId: `w${i + 1}` }));

    it('sends one request at a time, in order, and stops at the first failure', async () => {
      const r = await orderedReceiver((id) => (id === 'w3' ? 503 : 204));
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
      expect(await sender.sendInOrder(run(r.endpoint, 5), 60_000)).toEqual([
        { ok: true, status: 204 },
        { ok: true, status: 204 },
        { ok: false, status: 503, error: 'HTTP 503' },
      ]);
      expect(r.seen).toEqual(['w1', 'w2', 'w3']);
      expect(r.peak()).toBe(1);
    });

    it('starts no request once withinMs have passed since the run began', async () => {
      // Each arrival moves this clock a second on: the third request would start at 2 s.
      let now = 0;
      const clock = { now: () => now };
      const r = await orderedReceiver(
        () => 204,
        () => {
          now += 1000;
        },
      );
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), clock);
      expect(await sender.sendInOrder(run(r.endpoint, 5), 1500)).toHaveLength(2);
      expect(r.seen).toEqual(['w1', 'w2']);
      // The first request of a run goes out whatever the budget.
      expect(await sender.sendInOrder(run(r.endpoint, 2), 0)).toEqual([{ ok: true, status: 204 }]);
    });

    it('after stop, starts no further request of a run, and only the first of a new one', async () => {
      const r = await orderedReceiver(
        () => 204,
        () => {
          if (r.seen.length === 2) sender?.stop();
        },
      );
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
      expect(await sender.sendInOrder(run(r.endpoint, 5), 60_000)).toHaveLength(2);
      expect(r.seen).toEqual(['w1', 'w2']);
      expect(await sender.sendInOrder(run(r.endpoint, 3), 60_000)).toEqual([{ ok: true, status: 204 }]);
    });

    it('once its RunStop is stopped, starts no further request of that run; other runs go on', async () => {
      const stopped = new RunStop();
      let heard = 0;
      stopped.onStop(() => heard++);
      const r = await orderedReceiver(
        () => 204,
        () => {
          if (r.seen.length === 2) stopped.stop();
        },
      );
      sender = new RestHookSender(new EndpointGuard(new Allowlist(['127.0.0.1'])), Date);
      const other = new RunStop();
      expect(await sender.sendInOrder(run(r.endpoint, 5), 60_000, stopped)).toEqual([
        { ok: true, status: 204 },
        { ok: true, status: 204 },
      ]);
      expect(r.seen).toEqual(['w1', 'w2']);
      stopped.stop();
      expect(heard).toBe(1);
      expect(await sender.sendInOrder(run(r.endpoint, 3), 60_000, other)).toHaveLength(3);
      expect(r.seen).toEqual(['w1', 'w2', 'w1', 'w2', 'w3']);
    });

    it('ends a run at a request whose send throws, keeping what went before, and reports each success', async () => {
      const seen: [number, number][] = [];
      const send = async (n: number): Promise<SendResult> => {
        if (n === 3) throw new Error('boom');
        return { ok: true, status: 200 + n };
      };
      const results = await sendInOrder(
        send,
        [1, 2, 3, 4],
        60_000,
        Date,
        () => false,
        (count, status) => seen.push([count, status]),
      );
      expect(results).toEqual([
        { ok: true, status: 201 },
        { ok: true, status: 202 },
        { ok: false, error: 'sender failed: boom' },
      ]);
      expect(seen).toEqual([
        [1, 201],
        [2, 202],
      ]);
    });
  });
});
