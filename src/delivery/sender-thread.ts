import { parentPort, workerData } from 'node:worker_threads';
import { Allowlist } from './address-policy.js';
import { EndpointGuard, systemResolver } from './endpoint-guard.js';
import { RestHookSender, type WebhookRequest } from './rest-hook-sender.js';

/**
 * Entry of a `ThreadedSender` worker: one `RestHookSender` (SSRF guard with the broker's allow-list
 * and the system resolver) answering `{ id, req }` messages with `{ id, result }`.
 */

const { allowlist, userAgent } = workerData as { allowlist: readonly string[]; userAgent: string };
const sender = new RestHookSender(new EndpointGuard(new Allowlist(allowlist), systemResolver), Date, { userAgent });

parentPort?.on('message', (msg: { id: number; req: WebhookRequest }) => {
  // `send` answers failures as results; anything it throws still gets an answer, and the thread lives on.
  void sender
    .send(msg.req)
    .catch((err: unknown) => ({ ok: false as const, error: `sender failed: ${(err as Error).message}` }))
    .then((result) => parentPort?.postMessage({ id: msg.id, result }));
});
