import { Worker } from 'node:worker_threads';
import { memo } from '../core/memo.js';
import type { Logger } from '../observability/logger.js';
import { originOf } from './origin-limiter.js';
import type { RunStop, Sender, SendResult, WebhookRequest } from './rest-hook-sender.js';
import { CANCELLED, decodeResults, encodeRun, READY, STOP, WITHIN_AT, type Wire } from './sender-thread-protocol.js';

/**
 * A `Sender` whose webhook requests are signed and sent on worker threads, each running its own
 * `RestHookSender` (own undici pool, own SSRF guard built from the same allow-list, system DNS).
 * The event loop that parses `POST /events` and runs the delivery lanes then only posts a request
 * and takes back its `SendResult`: on the bench machine this took HMAC, undici and the socket
 * writes of webhooks off it (+~15% outbox throughput, bench/README.md).
 *
 * Requests are dealt to the threads in proportion to their shares of an origin's connections:
 * each goes to the thread with the fewest runs to its origin for its share (`#pick`), so every
 * thread's connections to a busy origin stay busy however requests to different origins
 * interleave, and a thread's queue for an origin holds no more than its share of what the
 * dispatcher hands over. They travel in batches: what the event loop sends during one
 * turn goes to each thread in one message (`sender-thread-protocol.ts`). A thread that dies answers
 * its requests as failed (the lanes retry them on their schedule) and is started again by the next
 * request.
 */

export interface ThreadedSenderOptions {
  readonly threads: number;
  readonly allowlist: readonly string[];
  readonly userAgent: string;
  /**
   * Connections to one origin, across the threads: split as evenly as whole numbers allow, so
   * together they never exceed it. At most this many threads start (each needs one).
   */
  readonly connectionsPerOrigin: number;
  readonly logger: Logger;
}

interface Run {
  readonly resolve: (results: SendResult[]) => void;
  /** Its endpoint's origin, as dealt (`#pick`); undefined with one thread. */
  readonly origin: string | undefined;
  /** Its slot in `progress`, or -1. */
  readonly slot: number;
  readonly length: number;
  /** `Thread.posts` when it was put in the outbox, and where its `withinMs` is there (a stop before the post clears it). */
  readonly post: number;
  readonly at: number;
}

interface Thread {
  worker: Worker;
  /** Exited: started again by the next request (not at once, so a thread that cannot start cannot spin). */
  stopped: boolean;
  /**
   * The thread said it listens. Until then nothing is posted to it: a run stopped meanwhile is
   * still in `outbox` and goes with none of its requests (posted, its first would go out once the
   * thread had loaded, after the client was told the subscription was deleted or moved).
   */
  ready: boolean;
  readonly pending: Map<number, Run>;
  /** Requests of this turn, not posted yet. */
  outbox: Wire;
  /** Runs stopped after they were posted: posted after `outbox`. */
  cancels: number[];
  /** Outboxes posted so far: a run whose `post` is this one is still in `outbox`. */
  posts: number;
  /**
   * Shared with the thread: per run slot, [successes so far, status of the last one], written by the
   * thread as each request of a run succeeds. A thread that dies mid-run never answers; this says
   * how far its runs got, so what was delivered is not charged with the failure and sent again.
   */
  readonly progress: Int32Array;
  /** Slots not in use. */
  readonly free: number[];
}

/** Progress slots per thread: more than the runs the dispatcher ever has in flight (512 by default). */
const SLOTS = 1024;

/** The worker's entry, next to this file (`.ts` under tsx, `.js` once compiled). */
const ENTRY = new URL(`./sender-thread${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url);

/** Under tsx the worker registers tsx's loader before importing its TypeScript entry. */
function workerSource(): string {
  const load = `import(${JSON.stringify(ENTRY.href)})`;
  if (!ENTRY.pathname.endsWith('.ts')) return load;
  const tsx = import.meta.resolve('tsx/esm/api');
  return `import(${JSON.stringify(tsx)}).then((m) => m.register()).then(() => ${load})`;
}

export class ThreadedSender implements Sender {
  readonly #options: ThreadedSenderOptions;
  readonly #threads: Thread[] = [];
  /** Each thread's share of an origin's connections (one entry per thread). */
  readonly #shares: readonly number[];
  /**
   * Per origin with runs pending: each thread's runs to it, then their sum (the entry goes at 0, so
   * this holds only what is in flight).
   */
  readonly #pending = new Map<string, number[]>();
  /** Endpoint → origin, parsed once per endpoint rather than once per request (as the dispatcher's caps count them). */
  readonly #origins = new Map<string, string>();
  /** Where the search for the least busy thread starts: turns round, so ties spread over the threads. */
  #next = 0;
  #ids = 1;
  #closed = false;
  /** `stop` was called: a thread started after it is told too. */
  #stopping = false;
  #scheduled = false;

  constructor(options: ThreadedSenderOptions) {
    this.#options = options;
    const threads = Math.max(1, Math.min(options.threads, options.connectionsPerOrigin));
    this.#shares = Array.from({ length: threads }, (_, i) =>
      connectionsForThread(options.connectionsPerOrigin, threads, i),
    );
    for (let i = 0; i < threads; i++) this.#threads.push(this.#start(i));
  }

  send(req: WebhookRequest): Promise<SendResult> {
    return this.sendInOrder([req], 0).then((results) => results[0] as SendResult);
  }

  sendInOrder(reqs: readonly WebhookRequest[], withinMs: number, run?: RunStop): Promise<SendResult[]> {
    if (this.#closed) return Promise.resolve([{ ok: false, error: 'the broker is shutting down' }]);
    if (run?.stopped === true) return Promise.resolve([]);
    const origin = this.#threads.length === 1 ? undefined : memo(this.#origins, reqs[0]?.endpoint ?? '', originOf);
    const index = origin === undefined ? 0 : this.#pick(origin);
    const thread = this.#threads[index] as Thread;
    if (thread.stopped) this.#start(index);
    const id = this.#ids++;
    const slot = thread.free.pop() ?? -1;
    if (slot >= 0) Atomics.store(thread.progress, 2 * slot, 0);
    run?.onStop(() => this.#cancel(thread, id));
    return new Promise((resolve) => {
      thread.pending.set(id, {
        resolve,
        origin,
        slot,
        length: reqs.length,
        post: thread.posts,
        at: thread.outbox.length + WITHIN_AT,
      });
      encodeRun(thread.outbox, id, slot, reqs, withinMs);
      this.#schedule();
    });
  }

  /**
   * The thread for a run to `origin`: the one with the fewest runs pending there for its share of
   * the origin's connections (as runs end unevenly, the next go where connections free up).
   */
  #pick(origin: string): number {
    const threads = this.#threads.length;
    let pending = this.#pending.get(origin);
    if (pending === undefined) {
      pending = new Array<number>(threads + 1).fill(0);
      this.#pending.set(origin, pending);
    }
    let best = this.#next;
    for (let k = 1; k < threads; k++) {
      const i = (this.#next + k) % threads;
      // pending[i] / shares[i] < pending[best] / shares[best], without dividing.
      if (
        (pending[i] as number) * (this.#shares[best] as number) <
        (pending[best] as number) * (this.#shares[i] as number)
      )
        best = i;
    }
    this.#next = (this.#next + 1) % threads;
    pending[best] = (pending[best] as number) + 1;
    pending[threads] = (pending[threads] as number) + 1;
    return best;
  }

  /** `run` on thread `index` is answered. */
  #settle(index: number, run: Run, results: SendResult[]): void {
    if (run.origin !== undefined) {
      const pending = this.#pending.get(run.origin);
      if (pending !== undefined) {
        pending[index] = (pending[index] as number) - 1;
        const threads = this.#threads.length;
        pending[threads] = (pending[threads] as number) - 1;
        if (pending[threads] === 0) this.#pending.delete(run.origin);
      }
    }
    run.resolve(results);
  }

  /** A run stopped before it was posted goes with none of its requests to send; one posted already, by a cancel message. */
  #cancel(thread: Thread, id: number): void {
    const run = thread.pending.get(id);
    if (run === undefined) return;
    if (run.post === thread.posts) {
      thread.outbox[run.at] = CANCELLED;
      return;
    }
    if (run.length === 1) return; // its one request is under way already
    thread.cancels.push(id);
    this.#schedule();
  }

  #schedule(): void {
    if (this.#scheduled) return;
    this.#scheduled = true;
    setImmediate(() => this.#post());
  }

  #post(): void {
    this.#scheduled = false;
    for (const thread of this.#threads) {
      if (!thread.ready) continue;
      if (thread.outbox.length > 0) {
        thread.worker.postMessage(thread.outbox);
        thread.outbox = [];
        thread.posts++;
      }
      if (thread.cancels.length > 0) {
        thread.worker.postMessage({ cancel: thread.cancels });
        thread.cancels = [];
      }
    }
  }

  stop(): void {
    this.#stopping = true;
    for (const thread of this.#threads) if (!thread.stopped) thread.worker.postMessage(STOP);
  }

  /** Ends the threads; attempts still in flight are answered as failed (callers give them their grace first). */
  async close(): Promise<void> {
    this.#closed = true;
    await Promise.all(this.#threads.map((t) => t.worker.terminate()));
  }

  #start(index: number): Thread {
    const { allowlist, userAgent } = this.#options;
    const connections = this.#shares[index] as number;
    const existing = this.#threads[index];
    const progress = existing?.progress ?? new Int32Array(new SharedArrayBuffer(2 * SLOTS * 4));
    const worker = new Worker(workerSource(), {
      eval: true,
      workerData: { allowlist, userAgent, connections, progress: progress.buffer },
    });
    worker.unref();
    if (this.#stopping) worker.postMessage(STOP);
    const thread: Thread = existing ?? {
      worker,
      stopped: false,
      ready: false,
      pending: new Map(),
      outbox: [],
      cancels: [],
      posts: 0,
      progress,
      free: Array.from({ length: SLOTS }, (_, i) => SLOTS - 1 - i),
    };
    thread.worker = worker;
    thread.stopped = false;
    thread.ready = false;
    worker.on('message', (wire: Wire | typeof READY) => {
      if (wire === READY) {
        thread.ready = true;
        this.#schedule();
        return;
      }
      decodeResults(wire, (id, results) => {
        const run = thread.pending.get(id);
        if (run === undefined) return;
        thread.pending.delete(id);
        if (run.slot >= 0) thread.free.push(run.slot);
        this.#settle(index, run, results);
      });
    });
    worker.on('error', (err) => this.#options.logger.error('webhook sender thread failed', { err }));
    worker.on('exit', (code) => {
      // Each run: the requests the thread saw succeed, then the one it was on, failed.
      for (const run of thread.pending.values()) {
        const count = run.slot < 0 ? 0 : Atomics.load(thread.progress, 2 * run.slot);
        const status = run.slot < 0 ? 0 : Atomics.load(thread.progress, 2 * run.slot + 1);
        const results: SendResult[] = Array.from({ length: count }, () => ({ ok: true, status }));
        if (count < run.length) results.push({ ok: false, error: `webhook sender thread stopped (exit ${code})` });
        if (run.slot >= 0) thread.free.push(run.slot);
        this.#settle(index, run, results);
      }
      thread.pending.clear();
      if (thread.worker === worker) {
        thread.stopped = true;
        // Runs encoded but not yet posted were just answered too: they must not reach the next thread.
        thread.outbox = [];
        thread.cancels = [];
      }
    });
    return thread;
  }
}

/** Thread `index`'s share of an origin's connections: the shares differ by at most one and sum to `total`. */
function connectionsForThread(total: number, threads: number, index: number): number {
  return Math.floor(total / threads) + (index < total % threads ? 1 : 0);
}
