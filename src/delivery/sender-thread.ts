import { parentPort, workerData } from 'node:worker_threads';
import { Allowlist } from './address-policy.js';
import { EndpointGuard, systemResolver } from './endpoint-guard.js';
import { RestHookSender, type SendResult } from './rest-hook-sender.js';
import { decodeRequests, encodeResult, type Wire } from './sender-thread-protocol.js';

/**
 * Entry of a `ThreadedSender` worker: one `RestHookSender` (SSRF guard with the broker's allow-list
 * and the system resolver) taking batches of requests and answering with batches of results: the
 * results that come in during one turn of this thread's loop go back in one message.
 */

const { allowlist, userAgent, connections } = workerData as {
  allowlist: readonly string[];
  userAgent: string;
  connections: number;
};
const sender = new RestHookSender(new EndpointGuard(new Allowlist(allowlist), systemResolver), Date, {
  userAgent,
  connections,
});

let results: Wire = [];
let scheduled = false;

function answer(id: number, result: SendResult): void {
  encodeResult(results, id, result);
  if (scheduled) return;
  scheduled = true;
  setImmediate(() => {
    scheduled = false;
    const batch = results;
    results = [];
    parentPort?.postMessage(batch);
  });
}

parentPort?.on('message', (wire: Wire) => {
  decodeRequests(wire, (id, req) => {
    // `send` answers failures as results; anything it throws still gets an answer, and the thread lives on.
    void sender
      .send(req)
      .catch((err: unknown) => ({ ok: false as const, error: `sender failed: ${(err as Error).message}` }))
      .then((result) => answer(id, result));
  });
});
