import { parentPort, workerData } from 'node:worker_threads';
import { Allowlist } from './address-policy.js';
import { defaultResolver, EndpointGuard } from './endpoint-guard.js';
import { RestHookSender, RunStop, type SendResult } from './rest-hook-sender.js';
import {
  CANCELLED,
  decodeRuns,
  encodeResults,
  READY,
  STOP,
  type ToThread,
  type Wire,
} from './sender-thread-protocol.js';

/**
 * Entry of a `ThreadedSender` worker: one `RestHookSender` (SSRF guard with the broker's allow-list
 * and the system resolver) taking batches of runs (`sendInOrder`) and answering with batches of
 * results: the runs that end during one turn of this thread's loop go back in one message.
 */

const { allowlist, userAgent, connections, progress } = workerData as {
  allowlist: readonly string[];
  userAgent: string;
  connections: number;
  /** Per run slot: [successes so far, status of the last one] (see `ThreadedSender`). */
  progress: SharedArrayBuffer;
};
const counts = new Int32Array(progress);
const sender = new RestHookSender(new EndpointGuard(new Allowlist(allowlist), defaultResolver), Date, {
  userAgent,
  connections,
});

let results: Wire = [];
let scheduled = false;
/** Runs under way, by id, for a cancel to find. */
const runs = new Map<number, RunStop>();

function answer(id: number, result: SendResult[]): void {
  encodeResults(results, id, result);
  if (scheduled) return;
  scheduled = true;
  setImmediate(() => {
    scheduled = false;
    const batch = results;
    results = [];
    parentPort?.postMessage(batch);
  });
}

parentPort?.on('message', (wire: ToThread) => {
  if (wire === STOP) {
    sender.stop();
    return;
  }
  if (!Array.isArray(wire)) {
    for (const id of wire.cancel) runs.get(id)?.stop();
    return;
  }
  decodeRuns(wire, (id, slot, reqs, withinMs) => {
    const run = new RunStop();
    if (withinMs === CANCELLED) run.stop();
    runs.set(id, run);
    const delivered =
      slot < 0
        ? undefined
        : (count: number, status: number) => {
            Atomics.store(counts, 2 * slot + 1, status);
            Atomics.store(counts, 2 * slot, count);
          };
    // `send` answers failures as results; anything it throws still gets an answer, and the thread lives on.
    void sender
      .sendInOrder(reqs, withinMs, run, delivered)
      .catch((err: unknown) => [{ ok: false as const, error: `sender failed: ${(err as Error).message}` }])
      .then((result) => {
        runs.delete(id);
        answer(id, result);
      });
  });
});

// Listening: the event loop posts runs from now on.
parentPort?.postMessage(READY);
