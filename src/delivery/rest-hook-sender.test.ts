import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { Allowlist } from './address-policy.js';
import { EndpointGuard } from './endpoint-guard.js';
import { RestHookSender, type WebhookRequest } from './rest-hook-sender.js';

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

/** A receiver on 127.0.0.1 answering each request with `answer`. */
async function receiver(answer: (res: import('node:http').ServerResponse) => void): Promise<string> {
  server = createServer((req, res) => {
    req.resume();
    req.on('end', () => answer(res));
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
});
