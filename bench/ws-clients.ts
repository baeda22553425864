import WebSocket from 'ws';

/**
 * Child process of suite `fanout`: opens WS_COUNT `ws` clients to WS_URL in batches of WS_BATCH,
 * each sending `bind-with-token WS_TOKEN` and waiting for its handshake, then reports `ready` over
 * IPC. On `arm` it counts event-notifications until every socket has one (or 10 s pass) and reports
 * `done` with the first and last arrival on the monotonic clock (`process.hrtime`, shared with the
 * parent process). Runs apart from the broker and the load generator so the broker's figures are
 * its own; every wait is bounded.
 */

const url = process.env.WS_URL ?? '';
const token = process.env.WS_TOKEN ?? '';
const count = Number(process.env.WS_COUNT ?? 0);
const batchSize = Number(process.env.WS_BATCH ?? 500);
const BATCH_TIMEOUT_MS = 30_000;
const TRIAL_TIMEOUT_MS = 10_000;

type Parent = { type: 'arm'; trial: number } | { type: 'close' };

const send = (msg: unknown): void => {
  process.send?.(msg);
};
const now = (): number => Number(process.hrtime.bigint());

const sockets: WebSocket[] = [];
let armed = false;
let trial = -1;
let got = 0;
let first = 0;
let last = 0;
let closedUnexpectedly = 0;
let closing = false;
let trialTimer: NodeJS.Timeout | undefined;

function finishTrial(): void {
  if (!armed) return;
  armed = false;
  clearTimeout(trialTimer);
  send({ type: 'done', trial, got, first, last, closed: closedUnexpectedly });
}

function open(): Promise<boolean> {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    sockets.push(ws);
    let bound = false;
    ws.on('open', () => ws.send(`bind-with-token ${token}`));
    ws.on('message', (data) => {
      if (!bound) {
        // The first frame after a bind is the handshake bundle (or an error text frame).
        bound = String(data).includes('"handshake"');
        resolve(bound);
        return;
      }
      if (!armed) return;
      const at = now();
      if (!String(data).includes('"event-notification"')) return;
      got++;
      if (got === 1) first = at;
      last = at;
      if (got === sockets.length) finishTrial();
    });
    ws.on('error', () => resolve(false));
    ws.on('close', () => {
      if (!closing) closedUnexpectedly++;
      resolve(false);
    });
  });
}

async function connectAll(): Promise<void> {
  const t0 = performance.now();
  let bound = 0;
  for (let i = 0; i < count; i += batchSize) {
    const n = Math.min(batchSize, count - i);
    const batch = Promise.all(Array.from({ length: n }, open));
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean[]>((resolve) => {
      timer = setTimeout(() => resolve([]), BATCH_TIMEOUT_MS);
    });
    const results = await Promise.race([batch, timeout]);
    clearTimeout(timer);
    const ok = results.filter(Boolean).length;
    bound += ok;
    if (ok < n) {
      send({ type: 'error', message: `batch at ${i}: ${ok} of ${n} sockets bound within ${BATCH_TIMEOUT_MS} ms` });
      return;
    }
  }
  send({ type: 'ready', bound, ms: performance.now() - t0, rssKb: process.memoryUsage().rss / 1024 });
}

process.on('message', (msg: Parent) => {
  if (msg.type === 'arm') {
    trial = msg.trial;
    got = 0;
    first = 0;
    last = 0;
    armed = true;
    trialTimer = setTimeout(finishTrial, TRIAL_TIMEOUT_MS);
    send({ type: 'armed', trial });
  } else if (msg.type === 'close') {
    closing = true;
    for (const ws of sockets) ws.terminate();
    process.exit(0);
  }
});
process.on('disconnect', () => process.exit(0));

connectAll().catch((err: unknown) => send({ type: 'error', message: String(err) }));
