import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Pool } from 'undici';
import {
  API_TOKEN,
  type Broker,
  cpuSeconds,
  json,
  postEvents,
  procStatus,
  sleep,
  startBroker,
  stopBroker,
  updatePatientEvent,
  waitFor,
} from './pipeline.js';
import { fmt, percentile, printTable, type TargetCheck } from './util.js';

/**
 * Suite `fanout` ("WebSocket channel"): one broker process, SOCKETS `ws` clients (in a separate
 * child process, bench/ws-clients.ts) all bound to ONE websocket subscription with the same
 * binding token, opened BATCH at a time. Then TRIALS times: one Patient event by POST /events, and
 * the time from that POST until every socket has the event-notification. Memory per idle socket:
 * (broker VmRSS with every socket bound and idle − VmRSS before connecting) / SOCKETS, no forced GC.
 */

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const SOCKETS = Number(process.env.BENCH_FANOUT_SOCKETS ?? 10_000);
const BATCH = 500;
const TRIALS = 10;
const NOFILE = 65_536;
const P99_TARGET_MS = 200;
const KB_PER_SOCKET_TARGET = 30;
const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
const FOCUS = 'fanout-patient';

type ChildMsg =
  | { type: 'ready'; bound: number; ms: number; rssKb: number }
  | { type: 'armed'; trial: number }
  | { type: 'done'; trial: number; got: number; first: number; last: number; closed: number }
  | { type: 'error'; message: string };

const websocketSubscription = {
  resourceType: 'Subscription',
  meta: { profile: [`${BACKPORT}/backport-subscription`] },
  status: 'requested',
  reason: 'bench fanout',
  criteria: 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change',
  _criteria: { extension: [{ url: `${BACKPORT}/backport-filter-criteria`, valueString: `Patient?_id=${FOCUS}` }] },
  channel: {
    type: 'websocket',
    payload: 'application/fhir+json',
    _payload: { extension: [{ url: `${BACKPORT}/backport-payload-content`, valueCode: 'id-only' }] },
  },
};

/** The clients' process, through bash so that `ulimit -n` can be raised; IPC (fd 3) survives the exec. */
function startClients(env: Record<string, string>): { child: ChildProcess; next: (ms: number) => Promise<ChildMsg> } {
  const child = spawn(
    'bash',
    [
      '-c',
      `ulimit -n ${NOFILE} 2>/dev/null; exec "$0" "$@"`,
      process.execPath,
      '--import',
      'tsx',
      'bench/ws-clients.ts',
    ],
    { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'inherit', 'inherit', 'ipc'] },
  );
  const inbox: ChildMsg[] = [];
  let wake: (() => void) | undefined;
  child.on('message', (m: ChildMsg) => {
    inbox.push(m);
    wake?.();
  });
  child.on('exit', () => wake?.());
  const next = async (ms: number): Promise<ChildMsg> => {
    const deadline = performance.now() + ms;
    for (;;) {
      const m = inbox.shift();
      if (m !== undefined) return m;
      if (child.exitCode !== null || child.signalCode !== null) throw new Error('ws client process exited');
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`ws client process silent for ${ms} ms`);
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, Math.min(left, 1000));
      });
      wake = undefined;
    }
  };
  return { child, next };
}

/** The broker's socket processes (`BROKER_WS_PROCESSES`): its direct children. */
function childPids(pid: number): number[] {
  try {
    return readdirSync(`/proc/${pid}/task`).flatMap((tid) =>
      readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number),
    );
  } catch {
    return [];
  }
}

/** VmRSS and VmHWM of the broker and its socket processes, summed (the peaks are an upper bound). */
function brokerMemory(pids: readonly number[]): { rssKb: number; hwmKb: number } {
  let rssKb = 0;
  let hwmKb = 0;
  for (const p of pids) {
    const s = procStatus(p);
    rssKb += s.rssKb;
    hwmKb += s.hwmKb;
  }
  return { rssKb, hwmKb };
}

const brokerCpu = (pids: readonly number[]): number => pids.reduce((sum, p) => sum + cpuSeconds(p), 0);

/** Kernel (system) CPU seconds of the processes so far. */
function systemSeconds(pids: readonly number[]): number {
  let sum = 0;
  for (const p of pids) {
    const fields = readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
    sum += Number(fields[12]) / 100;
  }
  return sum;
}

function nofileLimits(): string {
  try {
    return execFileSync('bash', ['-c', `echo "soft $(ulimit -Sn), hard $(ulimit -Hn)"`], { encoding: 'utf8' }).trim();
  } catch {
    return 'unknown';
  }
}

export async function runFanout(): Promise<TargetCheck[]> {
  console.log(`\n## fanout: ${fmt(SOCKETS)} WebSocket clients bound to ONE websocket subscription\n`);
  console.log(`ulimit -n here: ${nofileLimits()}; broker and client process start with ulimit -n ${NOFILE}`);
  const dataDir = mkdtempSync(join(tmpdir(), 'broker-bench-fanout-'));
  let broker: Broker | undefined;
  let clients: ChildProcess | undefined;
  let pool: Pool | undefined;
  const killOnExit = (): void => {
    broker?.child.kill('SIGKILL');
    clients?.kill('SIGKILL');
  };
  process.once('exit', killOnExit);
  try {
    // BENCH_WS_PROCESSES sets the broker's BROKER_WS_PROCESSES (unset: the broker's default).
    const wsProcesses = process.env.BENCH_WS_PROCESSES;
    broker = await startBroker(dataDir, {
      nofile: NOFILE,
      env: {
        // Every client socket comes from 127.0.0.1, BATCH of them connecting at once: one address
        // standing for many clients, as behind a proxy, so no per-address cap on unbound sockets.
        BROKER_WS_MAX_UNBOUND_PER_ADDRESS: '0',
        // One API client holds all 10,000 sockets: above its default share (a quarter of 20,000).
        BROKER_WS_MAX_PER_CLIENT: '0',
        ...(wsProcesses === undefined ? {} : { BROKER_WS_PROCESSES: wsProcesses }),
      },
    });
    const pid = broker.child.pid as number;
    pool = new Pool(`http://127.0.0.1:${broker.port}`, { connections: 4, pipelining: 1 });
    const created = await json(pool, '/fhir/Subscription', 'POST', API_TOKEN, websocketSubscription);
    if (created.status !== 201) throw new Error(`create websocket subscription: HTTP ${created.status}`);
    const id = String(created.body?.id);
    await waitFor('websocket subscription active', 10_000, async () => {
      const res = await json(pool as Pool, `/fhir/Subscription/${id}`, 'GET', API_TOKEN);
      return res.body?.status === 'active';
    });
    const tok = await json(pool, `/fhir/Subscription/${id}/$get-ws-binding-token`, 'GET', API_TOKEN);
    const params = (tok.body?.parameter ?? []) as { name: string; valueString?: string; valueUrl?: string }[];
    const token = params.find((p) => p.name === 'token')?.valueString;
    const wsUrl = params.find((p) => p.name === 'websocket-url')?.valueUrl;
    if (token === undefined || wsUrl === undefined) throw new Error('no binding token / websocket-url');
    await sleep(1000);
    const pids = [pid, ...childPids(pid)];
    console.log(`broker processes: main + ${pids.length - 1} socket process(es) (BROKER_WS_PROCESSES)`);
    const rss0 = brokerMemory(pids).rssKb;

    const started = startClients({
      WS_URL: wsUrl,
      WS_TOKEN: token,
      WS_COUNT: String(SOCKETS),
      WS_BATCH: String(BATCH),
    });
    clients = started.child;
    const ready = await started.next(180_000);
    if (ready.type !== 'ready') throw new Error(`ws clients: ${JSON.stringify(ready)}`);
    const connectMs = ready.ms;
    await sleep(2000);
    const rss1 = brokerMemory(pids).rssKb;
    const kbPerSocket = (rss1 - rss0) / SOCKETS;

    const allMs: number[] = [];
    const firstMs: number[] = [];
    let incomplete = 0;
    let closed = 0;
    const clientPid = clients.pid as number;
    const clientCpu0 = cpuSeconds(clientPid);
    const cpu0 = brokerCpu(pids);
    const sys0 = systemSeconds(pids);
    let busy = 0;
    for (let t = 0; t < TRIALS; t++) {
      clients.send({ type: 'arm', trial: t });
      const armed = await started.next(10_000);
      if (armed.type !== 'armed') throw new Error(`ws clients: ${JSON.stringify(armed)}`);
      const t0 = Number(process.hrtime.bigint());
      const w0 = performance.now();
      const res = await postEvents(pool, updatePatientEvent(`fanout-${Date.now().toString(36)}-${t}`, FOCUS));
      if (res.status !== 202 || res.accepted !== 1) throw new Error(`POST /events: HTTP ${res.status}`);
      const done = await started.next(15_000);
      if (done.type !== 'done') throw new Error(`ws clients: ${JSON.stringify(done)}`);
      busy += performance.now() - w0;
      closed = done.closed;
      if (done.got < SOCKETS) incomplete++;
      else allMs.push((done.last - t0) / 1e6);
      firstMs.push((done.first - t0) / 1e6);
      await sleep(300);
    }
    const cpu1 = brokerCpu(pids);
    const clientCpu1 = cpuSeconds(clientPid);
    const sys1 = systemSeconds(pids);
    const after = brokerMemory(pids);
    const sorted = Float64Array.from(allMs).sort();
    const firstSorted = Float64Array.from(firstMs).sort();
    printTable([
      [
        `${fmt(SOCKETS)} sockets, ${TRIALS} trials`,
        'p50 ms',
        'p99 ms',
        'min ms',
        'max ms',
        'first socket p50 ms',
        'incomplete trials',
      ],
      [
        'POST /events → every socket has it',
        fmt(percentile(sorted, 50), 1),
        fmt(percentile(sorted, 99), 1),
        fmt(percentile(sorted, 0), 1),
        fmt(percentile(sorted, 100), 1),
        fmt(percentile(firstSorted, 50), 1),
        fmt(incomplete),
      ],
    ]);
    console.log('');
    printTable([
      [
        'broker memory',
        'RSS before (MiB)',
        `RSS ${fmt(SOCKETS)} bound idle (MiB)`,
        'KB per idle socket',
        'RSS after trials',
      ],
      [
        pids.length > 1 ? `VmRSS, main + ${pids.length - 1} socket processes` : 'VmRSS',
        fmt(rss0 / 1024, 1),
        fmt(rss1 / 1024, 1),
        fmt(kbPerSocket, 1),
        `${fmt(after.rssKb / 1024, 1)} (peak ${fmt(after.hwmKb / 1024, 1)})`,
      ],
    ]);
    console.log(
      `\nconnect + bind ${fmt(SOCKETS)} sockets in batches of ${BATCH}: ${fmt(connectMs / 1000, 1)} s; client process RSS ${fmt(ready.rssKb / 1024, 1)} MiB; broker CPU (all its processes) during the trials ${fmt((100 * (cpu1 - cpu0)) / (busy / 1000))}% of the time from each POST to the last socket (${fmt((100 * (sys1 - sys0)) / Math.max(cpu1 - cpu0, 0.01))}% of it in the kernel), client process CPU ${fmt((100 * (clientCpu1 - clientCpu0)) / (busy / 1000))}%; sockets closed unexpectedly: ${closed}`,
    );
    if (broker.warnings.length > 0)
      console.log(`broker warnings/errors:\n  ${broker.warnings.slice(0, 5).join('\n  ')}`);
    const p99 = percentile(sorted, 99);
    return [
      {
        suite: 'fanout',
        target: `p99 POST → all ${fmt(SOCKETS)} sockets < ${P99_TARGET_MS} ms`,
        measured: incomplete > 0 ? `${incomplete} trial(s) incomplete` : `${fmt(p99, 1)} ms`,
        met: incomplete === 0 && p99 < P99_TARGET_MS,
      },
      {
        suite: 'fanout',
        target: `< ${KB_PER_SOCKET_TARGET} KB broker RSS per idle socket`,
        measured: `${fmt(kbPerSocket, 1)} KB`,
        met: kbPerSocket < KB_PER_SOCKET_TARGET,
      },
    ];
  } catch (err) {
    const exited = broker?.exited();
    throw exited === undefined ? err : new Error(`${exited}\n(while the bench saw: ${(err as Error).message})`);
  } finally {
    if (clients !== undefined && clients.exitCode === null && clients.signalCode === null) {
      const gone = new Promise<void>((resolve) => clients?.once('exit', () => resolve()));
      if (clients.connected) clients.send({ type: 'close' });
      const timer = setTimeout(() => clients?.kill('SIGKILL'), 5000);
      await gone;
      clearTimeout(timer);
    }
    await pool?.close().catch(() => undefined);
    if (broker !== undefined) await stopBroker(broker.child);
    process.removeListener('exit', killOnExit);
    rmSync(dataDir, { recursive: true, force: true });
  }
}
