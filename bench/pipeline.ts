import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { closeSync, fdatasyncSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { Pool } from 'undici';
import { startNodeFlags } from '../src/start-command.js';
import { fmt, percentile, printTable, prng, shuffle, type TargetCheck } from './util.js';

/**
 * Suite `pipeline`: the real broker as a child process (as `npm start` runs it: `node <flags> --import tsx src/main.ts`, embedded
 * SQLite in a fresh temp dir) fed over HTTP on 127.0.0.1, delivering to a real node:http receiver
 * on 127.0.0.1 that answers 204. Phases:
 *   1. max ingest: bounded closed-loop bursts of single-event and 10-event requests, then the time
 *      until every expected notification has reached the receiver;
 *   2. open loop: 500 events/s for 10 s, one event per request, per-notification latency from the
 *      event's scheduled send time to the webhook's arrival at the receiver.
 * Every number of events, request and wait is bounded; the child is killed on every exit path.
 */

const ROOT = fileURLToPath(new URL('..', import.meta.url));
export const API_TOKEN = 'bench-api-token-0123456789abcdef';
export const INGEST_TOKEN = 'bench-ingest-token-0123456789abcdef';
const TOPIC = 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change';
const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
const DATASTORE = 'abcdef01234567890abcdef012345678';

export const SUBSCRIPTIONS = 100;
/** Patient ids `pat-00000`…: each is in one subscriber's panel, every other one in a second one. */
export const PATIENTS = 10_000;
export const BURST_EVENTS = 10_000;
export const BURST_CONCURRENCY = 32;
export const RATE = 500;
export const RATE_SECONDS = 10;
const P99_TARGET_MS = 20;

export const patientId = (i: number): string => `pat-${String(i).padStart(5, '0')}`;

/** Subscriber indexes whose `_id` filter holds patient i (1 or 2 of them; 1.5 on average). */
export function panelsOf(i: number): number[] {
  const first = i % SUBSCRIPTIONS;
  if (i % 2 === 1) return [first];
  return [first, (first + 1 + (Math.floor(i / SUBSCRIPTIONS) % (SUBSCRIPTIONS - 1))) % SUBSCRIPTIONS];
}

/** `maxCount`: the channel's `backport-max-count` (events one bundle may carry; the IG's default is 1). */
export function subscriptionBody(n: number, endpoint: string, ids: readonly string[], maxCount?: number): unknown {
  return {
    resourceType: 'Subscription',
    meta: { profile: [`${BACKPORT}/backport-subscription`] },
    status: 'requested',
    reason: `bench panel ${n}`,
    criteria: TOPIC,
    _criteria: {
      extension: [{ url: `${BACKPORT}/backport-filter-criteria`, valueString: `Patient?_id=${ids.join(',')}` }],
    },
    channel: {
      type: 'rest-hook',
      endpoint,
      payload: 'application/fhir+json',
      _payload: { extension: [{ url: `${BACKPORT}/backport-payload-content`, valueCode: 'id-only' }] },
      ...(maxCount === undefined
        ? {}
        : { extension: [{ url: `${BACKPORT}/backport-max-count`, valuePositiveInt: maxCount }] }),
    },
  };
}

const TEMPLATE = JSON.parse(readFileSync(join(ROOT, 'test/fixtures/healthlake-update-patient.json'), 'utf8')) as {
  id: string;
  time: string;
  detail: {
    eventTime: string;
    eventID: string;
    requestParameters: { datastoreId: string };
    additionalEventData: { resourceId: string };
  };
};

/** A HealthLake UpdateResource event for Patient/<resourceId>, shaped like the fixture. */
export function updatePatientEvent(eventId: string, resourceId: string): unknown {
  const now = new Date().toISOString();
  return {
    ...TEMPLATE,
    id: eventId,
    time: now,
    detail: {
      ...TEMPLATE.detail,
      eventTime: now,
      eventID: eventId,
      requestParameters: { ...TEMPLATE.detail.requestParameters, datastoreId: DATASTORE },
      additionalEventData: { resourceId },
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Receiver

export class Receiver {
  readonly server: Server;
  handshakes = 0;
  notifications = 0;
  lastAt = 0;
  /** Latency phase: resourceId → scheduled send time (performance.now()). */
  sendTimes: Map<string, number> | undefined;
  latencies: number[] = [];
  unexpected = 0;
  /** Event notifications answered 503 on a `/fail/` path (a failing subscriber; its handshake gets 204). */
  refused = 0;
  /** Focus entries that carried the resource (full-resource content). */
  resources = 0;

  constructor() {
    this.server = createServer((req, res) => this.#handle(req, res));
    this.server.keepAliveTimeout = 60_000;
  }

  listen(): Promise<number> {
    return new Promise((resolve) =>
      this.server.listen(0, '127.0.0.1', () => resolve((this.server.address() as AddressInfo).port)),
    );
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  #handle(req: IncomingMessage, res: ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const at = performance.now();
      if (req.url?.startsWith('/fail/')) {
        const handshake = Buffer.concat(chunks).includes('"valueCode":"handshake"');
        if (handshake) this.handshakes++;
        else this.refused++;
        res.writeHead(handshake ? 204 : 503).end();
        return;
      }
      res.writeHead(204).end();
      try {
        this.#record(JSON.parse(Buffer.concat(chunks).toString('utf8')) as Bundle, at);
      } catch {
        this.unexpected++;
      }
    });
  }

  #record(bundle: Bundle | ForwardedEvent, at: number): void {
    if ('detail-type' in bundle) {
      // The forwarder's notification: the event itself.
      this.#notified(bundle.detail?.additionalEventData?.resourceId ?? '', at);
      return;
    }
    const params = bundle.entry?.[0]?.resource?.parameter ?? [];
    const type = params.find((p) => p.name === 'type')?.valueCode;
    if (type === 'handshake') {
      this.handshakes++;
      return;
    }
    if (type !== 'event-notification') {
      this.unexpected++;
      return;
    }
    for (const e of bundle.entry?.slice(1) ?? []) if (e.resource !== undefined) this.resources++;
    for (const p of params) {
      if (p.name !== 'notification-event') continue;
      const focus = p.part?.find((q) => q.name === 'focus')?.valueReference?.reference ?? '';
      this.#notified(focus.slice(focus.lastIndexOf('/') + 1), at);
    }
  }

  #notified(resourceId: string, at: number): void {
    this.notifications++;
    this.lastAt = at;
    const sentAt = this.sendTimes?.get(resourceId);
    if (sentAt !== undefined) this.latencies.push(at - sentAt);
    else if (this.sendTimes !== undefined) this.unexpected++;
  }
}

/** What the forwarder POSTs: the EventBridge event as it came. */
interface ForwardedEvent {
  'detail-type': string;
  detail?: { additionalEventData?: { resourceId?: string } };
}

interface Parameter {
  name: string;
  valueCode?: string;
  valueReference?: { reference?: string };
  part?: Parameter[];
}
interface Bundle {
  entry?: { resource?: { parameter?: Parameter[] } }[];
}

// ---------------------------------------------------------------------------------------------
// Broker child process

export interface Broker {
  readonly child: ChildProcess;
  readonly port: number;
  readonly warnings: string[];
  /** Why the child ended, once it has: exit code or signal and the tail of its stderr. */
  exited(): string | undefined;
}

export interface StartOptions {
  /** Extra environment (wins over the defaults below). */
  readonly env?: Readonly<Record<string, string>>;
  /** Script to run instead of the broker (the bench's forwarder speaks the same `listening` line). */
  readonly script?: string;
  /** Start through `bash -c 'ulimit -n N; exec node …'` (the pid is still node's). */
  readonly nofile?: number;
  /** Node flags beyond `npm start`'s (bench/ab.ts `flags:`). */
  readonly nodeFlags?: readonly string[];
}

/** `npm start`'s Node flags: the bench measures the process a user runs, and gives the forwarder the same. */
const START_FLAGS = startNodeFlags();

export function startBroker(dataDir: string, options: StartOptions = {}): Promise<Broker> {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('BROKER_') && k !== 'PORT') env[k] = v;
  Object.assign(env, {
    PORT: '0',
    HOST: '127.0.0.1',
    BROKER_DATA_DIR: dataDir,
    BROKER_API_KEYS: `bench:${API_TOKEN}`,
    BROKER_INGEST_TOKEN: INGEST_TOKEN,
    BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1',
    BROKER_LOG_LEVEL: 'info',
    ...options.env,
  });
  const nodeArgs = process.env.BENCH_CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`] : [];
  const args = [
    ...START_FLAGS,
    ...(options.nodeFlags ?? []),
    ...nodeArgs,
    '--import',
    'tsx',
    options.script ?? 'src/main.ts',
  ];
  const child =
    options.nofile === undefined
      ? spawn(process.execPath, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn('bash', ['-c', `ulimit -n ${options.nofile} 2>/dev/null; exec "$0" "$@"`, process.execPath, ...args], {
          cwd: ROOT,
          env,
          stdio: ['ignore', 'pipe', 'pipe'],
        });
  const warnings: string[] = [];
  let stderr = '';
  let exited: string | undefined;
  child.stderr?.on('data', (c: Buffer) => {
    stderr = (stderr + c.toString()).slice(-4000);
  });
  child.once('exit', (code, signal) => {
    exited = `broker exited (${signal ?? `code ${code}`}):\n${stderr.trim()}`;
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`broker did not report listening within 20 s\n${stderr}`)), 20_000);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`broker exited early (code ${code})\n${stderr}`));
    });
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
      let rec: { msg?: string; level?: string; port?: number };
      try {
        rec = JSON.parse(line) as typeof rec;
      } catch {
        return;
      }
      if (rec.msg === 'listening' && typeof rec.port === 'number') {
        clearTimeout(timer);
        resolve({ child, port: rec.port, warnings, exited: () => exited });
      } else if (rec.level === 'warn' || rec.level === 'error') {
        if (warnings.length < 20) warnings.push(line.slice(0, 300));
      }
    });
  });
}

export async function stopBroker(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 8_000);
  await exited;
  clearTimeout(timer);
}

/**
 * Runs `body` against a broker child started in `dataDir` with a keep-alive pool of `connections`:
 * the child is killed on every exit path (even the bench's own exit), the pool closed, `dataDir`
 * removed, and a failure caused by the broker dying says so with its stderr.
 */
export async function withBroker<T>(
  dataDir: string,
  options: StartOptions & { readonly connections: number },
  body: (broker: Broker, pool: Pool) => Promise<T>,
): Promise<T> {
  let broker: Broker | undefined;
  let pool: Pool | undefined;
  const killOnExit = (): void => void broker?.child.kill('SIGKILL');
  process.once('exit', killOnExit);
  try {
    broker = await startBroker(dataDir, options);
    pool = new Pool(`http://127.0.0.1:${broker.port}`, { connections: options.connections, pipelining: 1 });
    return await body(broker, pool);
  } catch (err) {
    const exited = broker?.exited();
    throw exited === undefined ? err : new Error(`${exited}\n(while the bench saw: ${(err as Error).message})`);
  } finally {
    await pool?.close().catch(() => undefined);
    if (broker !== undefined) await stopBroker(broker.child);
    process.removeListener('exit', killOnExit);
    rmSync(dataDir, { recursive: true, force: true });
  }
}

/** Latency of a durable (synchronous=FULL, WAL) one-row SQLite commit in `dir`: the disk's fsync cost. */
export function fsyncProbe(dir: string): { p50: number; p99: number } {
  const db = new Database(join(dir, 'probe.sqlite3'));
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.exec('CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)');
    const insert = db.prepare('INSERT INTO t (v) VALUES (?)');
    const commit = db.transaction(() => insert.run('x'.repeat(300)));
    const times: number[] = [];
    for (let i = 0; i < 300; i++) {
      const t0 = performance.now();
      commit();
      times.push(performance.now() - t0);
    }
    const sorted = Float64Array.from(times).sort();
    return { p50: percentile(sorted, 50), p99: percentile(sorted, 99) };
  } finally {
    db.close();
  }
}

/**
 * Before a latency measurement: flush what earlier phases left for the disk (`sync`), then wait
 * until 20 fdatasyncs in a row take under 5 ms each, at most `timeoutMs`. On this VM an fsync
 * waits behind the ext4 journal: after an earlier phase's data dir (a 40 MB WAL and its database)
 * was removed, commits waited 30–110 ms, and an independent fsync probe stalled at the same
 * instants as the broker's commits. Returns the seconds it took.
 */
export function settleDisk(dir: string, timeoutMs = 10_000): number {
  const started = performance.now();
  execFileSync('sync');
  const file = join(dir, 'settle.probe');
  const fd = openSync(file, 'w');
  const block = Buffer.alloc(4096, 1);
  try {
    let quiet = 0;
    for (let i = 0; quiet < 20 && performance.now() - started < timeoutMs; i++) {
      writeSync(fd, block, 0, block.length, (i % 64) * 4096);
      const t0 = performance.now();
      fdatasyncSync(fd);
      quiet = performance.now() - t0 < 5 ? quiet + 1 : 0;
    }
  } finally {
    closeSync(fd);
    rmSync(file, { force: true });
  }
  return (performance.now() - started) / 1000;
}

/** [steal, total] jiffies of all CPUs: how much the hypervisor took from this VM. */
export function stealJiffies(): [number, number] {
  const cpu = readFileSync('/proc/stat', 'utf8').split('\n')[0]?.trim().split(/\s+/).slice(1).map(Number) ?? [];
  return [cpu[7] ?? 0, cpu.slice(0, 8).reduce((a, b) => a + b, 0)];
}

export function procStatus(pid: number): { rssKb: number; hwmKb: number } {
  const text = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? Number.NaN);
  return { rssKb: kb('VmRSS'), hwmKb: kb('VmHWM') };
}

/** User+system CPU seconds the process has used so far. */
export function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

// ---------------------------------------------------------------------------------------------

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export async function waitFor(what: string, timeoutMs: number, done: () => boolean | Promise<boolean>): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!(await done())) {
    if (performance.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
}

export async function json(pool: Pool, path: string, method: 'GET' | 'POST', token: string, body?: unknown) {
  const res = await pool.request({
    path,
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/fhir+json' },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await res.body.text();
  return { status: res.statusCode, body: text === '' ? undefined : (JSON.parse(text) as Record<string, unknown>) };
}

export async function subscribe(
  pool: Pool,
  receiverPort: number,
  pathOf: (n: number) => string = (n) => `/hook/${n}`,
  maxCount?: number,
): Promise<string[]> {
  const panels: string[][] = Array.from({ length: SUBSCRIPTIONS }, () => []);
  for (let i = 0; i < PATIENTS; i++) for (const s of panelsOf(i)) panels[s]?.push(patientId(i));
  const ids: string[] = [];
  for (const [n, panel] of panels.entries()) {
    const res = await json(
      pool,
      '/fhir/Subscription',
      'POST',
      API_TOKEN,
      subscriptionBody(n, `http://127.0.0.1:${receiverPort}${pathOf(n)}`, panel, maxCount),
    );
    if (res.status !== 201) throw new Error(`create subscription ${n}: HTTP ${res.status} ${JSON.stringify(res.body)}`);
    ids.push(String(res.body?.id));
  }
  await waitFor('all subscriptions active', 30_000, async () => {
    for (const id of ids) {
      const res = await json(pool, `/fhir/Subscription/${id}`, 'GET', API_TOKEN);
      if (res.body?.status !== 'active') return false;
    }
    return true;
  });
  return ids;
}

export interface Post {
  readonly status: number;
  readonly accepted: number;
}

export async function postEvents(pool: Pool, events: unknown): Promise<Post> {
  const res = await pool.request({
    path: '/events',
    method: 'POST',
    headers: { authorization: `Bearer ${INGEST_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(events),
  });
  const text = await res.body.text();
  const accepted = res.statusCode === 202 ? Number((JSON.parse(text) as { accepted: number }).accepted) : 0;
  return { status: res.statusCode, accepted };
}

export interface BurstResult {
  readonly label: string;
  readonly events: number;
  readonly requests: number;
  readonly ingestSeconds: number;
  readonly notifications: number;
  readonly deliverSeconds: number;
  readonly brokerCpu: number;
  readonly failures: number;
  readonly rssMiB: number;
}

export interface BurstOptions {
  /** Notifications the receiver counts for patient i (default: every panel holding it). */
  readonly countOf?: (i: number) => number;
  /** Stop starting requests after this many seconds. */
  readonly maxSeconds?: number;
  readonly deliverTimeoutMs?: number;
}

/** Closed loop: `concurrency` clients post `total` events `perRequest` at a time, then wait for delivery. */
export async function burst(
  pool: Pool,
  receiver: Receiver,
  pid: number,
  run: string,
  perRequest: number,
  total: number,
  concurrency: number,
  options: BurstOptions = {},
): Promise<BurstResult> {
  const countOf = options.countOf ?? ((i: number) => panelsOf(i).length);
  const rand = prng(0xb0057 + perRequest);
  const requests: { resourceId: string; eventId: string; expected: number }[][] = [];
  for (let e = 0; e < total; e += perRequest) {
    const batch = [];
    for (let k = 0; k < perRequest; k++) {
      const i = Math.floor(rand() * PATIENTS);
      batch.push({ resourceId: patientId(i), eventId: `${run}-b${perRequest}-${e + k}`, expected: countOf(i) });
    }
    requests.push(batch);
  }
  const before = receiver.notifications;
  const cpu0 = cpuSeconds(pid);
  let next = 0;
  let failures = 0;
  let accepted = 0;
  let issued = 0;
  let expected = 0;
  const t0 = performance.now();
  // With maxSeconds, no new request starts after the deadline (slow stores): figures cover what was sent.
  const deadline = t0 + (options.maxSeconds ?? Number.POSITIVE_INFINITY) * 1000;
  const client = async (): Promise<void> => {
    while (next < requests.length && performance.now() < deadline) {
      const batch = requests[next++] ?? [];
      issued += batch.length;
      for (const b of batch) expected += b.expected;
      const events = batch.map((b) => updatePatientEvent(b.eventId, b.resourceId));
      const res = await postEvents(pool, perRequest === 1 ? events[0] : events);
      if (res.status !== 202) failures++;
      accepted += res.accepted;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, client));
  const t1 = performance.now();
  await waitFor(
    `${expected} notifications`,
    options.deliverTimeoutMs ?? 60_000,
    () => receiver.notifications - before >= expected,
  );
  const cpu1 = cpuSeconds(pid);
  if (accepted !== issued) failures += issued - accepted;
  return {
    label: perRequest === 1 ? '1 event/request' : `${perRequest} events/request`,
    events: issued,
    requests: Math.ceil(issued / perRequest),
    ingestSeconds: (t1 - t0) / 1000,
    notifications: receiver.notifications - before,
    deliverSeconds: (receiver.lastAt - t0) / 1000,
    brokerCpu: (cpu1 - cpu0) / ((receiver.lastAt - t0) / 1000),
    failures,
    rssMiB: procStatus(pid).rssKb / 1024,
  };
}

export interface RateResult {
  readonly events: number;
  readonly seconds: number;
  readonly notifications: number;
  readonly latencies: Float64Array;
  readonly ingest: Float64Array;
  readonly maxLagMs: number;
  readonly failures: number;
  readonly brokerCpu: number;
  readonly unexpected: number;
}

/** Open loop: event i is due at t0 + i/rate whatever the answers; latency counts from that time. */
export interface OpenLoopOptions {
  /** Notifications the receiver counts for patient i (default: every panel holding it). */
  readonly countOf?: (i: number) => number;
  readonly rate?: number;
  readonly seconds?: number;
}

export async function openLoop(
  pool: Pool,
  receiver: Receiver,
  pid: number,
  run: string,
  options: OpenLoopOptions = {},
): Promise<RateResult> {
  const countOf = options.countOf ?? ((i: number) => panelsOf(i).length);
  const rate = options.rate ?? RATE;
  const total = rate * (options.seconds ?? RATE_SECONDS);
  const order = shuffle(
    prng(0x0be7),
    Array.from({ length: PATIENTS }, (_, i) => i),
  ).slice(0, total);
  const expected = order.reduce((sum, i) => sum + countOf(i), 0);
  const sendTimes = new Map<string, number>();
  receiver.sendTimes = sendTimes;
  receiver.latencies = [];
  const unexpected0 = receiver.unexpected;
  const before = receiver.notifications;
  const ingest: number[] = [];
  const inflight: Promise<void>[] = [];
  let failures = 0;
  let maxLag = 0;
  const interval = 1000 / rate;
  const cpu0 = cpuSeconds(pid);
  const t0 = performance.now() + 5;
  let sent = 0;
  while (sent < total) {
    const now = performance.now();
    const due = Math.min(total, Math.floor((now - t0) / interval) + 1);
    for (; sent < due; sent++) {
      const i = order[sent] as number;
      const scheduled = t0 + sent * interval;
      sendTimes.set(patientId(i), scheduled);
      maxLag = Math.max(maxLag, performance.now() - scheduled);
      const body = updatePatientEvent(`${run}-r-${sent}`, patientId(i));
      inflight.push(
        postEvents(pool, body).then(
          (res) => {
            ingest.push(performance.now() - scheduled);
            if (res.status !== 202 || res.accepted !== 1) failures++;
          },
          () => void failures++,
        ),
      );
    }
    await sleep(1);
  }
  const t1 = performance.now();
  await Promise.all(inflight);
  await waitFor(`${expected} notifications`, 30_000, () => receiver.notifications - before >= expected);
  const cpu1 = cpuSeconds(pid);
  receiver.sendTimes = undefined;
  return {
    events: total,
    seconds: (t1 - t0) / 1000,
    notifications: receiver.notifications - before,
    latencies: Float64Array.from(receiver.latencies).sort(),
    ingest: Float64Array.from(ingest).sort(),
    maxLagMs: maxLag,
    failures,
    brokerCpu: (cpu1 - cpu0) / ((receiver.lastAt - t0) / 1000),
    unexpected: receiver.unexpected - unexpected0,
  };
}

export async function runPipeline(): Promise<TargetCheck[]> {
  console.log('\n## pipeline: real broker (child process, SQLite) → real webhook receiver, all on 127.0.0.1\n');
  const dataDir = mkdtempSync(join(tmpdir(), 'broker-bench-'));
  const receiver = new Receiver();
  try {
    const probe = fsyncProbe(dataDir);
    const steal0 = stealJiffies();
    console.log(
      `durable SQLite commit in ${tmpdir()} (fsync probe): p50 ${fmt(probe.p50, 2)} ms, p99 ${fmt(probe.p99, 2)} ms`,
    );
    const receiverPort = await receiver.listen();
    return await withBroker(dataDir, { connections: BURST_CONCURRENCY }, async (broker, pool) => {
      const pid = broker.child.pid as number;
      const rssIdle = procStatus(pid).rssKb / 1024;
      const tSub = performance.now();
      await subscribe(pool, receiverPort);
      console.log(
        `${SUBSCRIPTIONS} subscriptions active in ${fmt((performance.now() - tSub) / 1000, 2)} s (${receiver.handshakes} handshakes); broker RSS ${fmt(rssIdle, 1)} MiB at start, ${fmt(procStatus(pid).rssKb / 1024, 1)} MiB with subscriptions`,
      );
      const run = `bench-${Date.now().toString(36)}`;
      const bursts = [
        await burst(pool, receiver, pid, run, 1, BURST_EVENTS, BURST_CONCURRENCY),
        await burst(pool, receiver, pid, run, 10, BURST_EVENTS, BURST_CONCURRENCY / 2),
      ];
      printTable([
        [
          'max ingest',
          'events',
          'requests',
          'events/s accepted',
          'notifications',
          'notifications/s delivered',
          'drain after last 202 (s)',
          'broker CPU',
          'RSS after (MiB)',
          'failures',
        ],
        ...bursts.map((b) => [
          `${b.label}, ${b.label.startsWith('1 ') ? BURST_CONCURRENCY : BURST_CONCURRENCY / 2} clients`,
          fmt(b.events),
          fmt(b.requests),
          fmt(b.events / b.ingestSeconds),
          fmt(b.notifications),
          fmt(b.notifications / b.deliverSeconds),
          fmt(b.deliverSeconds - b.ingestSeconds, 2),
          `${fmt(b.brokerCpu * 100)}%`,
          fmt(b.rssMiB, 1),
          fmt(b.failures),
        ]),
      ]);

      const settled = settleDisk(dataDir);
      const r = await openLoop(pool, receiver, pid, run);
      const mem = procStatus(pid);
      const p = (q: number): string => fmt(percentile(r.latencies, q), 1);
      const pi = (q: number): string => fmt(percentile(r.ingest, q), 1);
      console.log('');
      printTable([
        [
          `open loop ${RATE} events/s`,
          'events',
          'seconds',
          'notifications',
          'p50 ms',
          'p90 ms',
          'p99 ms',
          'max ms',
          'broker CPU',
        ],
        [
          'ingest → webhook received',
          fmt(r.events),
          fmt(r.seconds, 1),
          fmt(r.latencies.length),
          p(50),
          p(90),
          p(99),
          p(100),
          `${fmt(r.brokerCpu * 100)}%`,
        ],
        ['POST /events → 202', fmt(r.events), '', '', pi(50), pi(90), pi(99), pi(100), ''],
      ]);
      console.log(
        `\ndisk settled in ${fmt(settled, 1)} s before it (sync, 20 quiet fdatasyncs); client schedule lag max ${fmt(r.maxLagMs, 1)} ms; failed requests ${r.failures}; unexpected notifications ${r.unexpected}; broker RSS ${fmt(mem.rssKb / 1024, 1)} MiB (peak ${fmt(mem.hwmKb / 1024, 1)} MiB)`,
      );
      const steal1 = stealJiffies();
      console.log(`CPU steal during the suite: ${fmt((100 * (steal1[0] - steal0[0])) / (steal1[1] - steal0[1]), 1)}%`);
      if (broker.warnings.length > 0) console.log(`broker warnings/errors:\n  ${broker.warnings.join('\n  ')}`);
      const p99 = percentile(r.latencies, 99);
      return [
        {
          suite: 'pipeline',
          target: `p99 ingest→webhook < ${P99_TARGET_MS} ms at ${RATE} events/s`,
          measured: `${fmt(p99, 1)} ms`,
          met: p99 < P99_TARGET_MS && r.failures === 0 && r.notifications === r.latencies.length,
        },
      ];
    });
  } finally {
    await receiver.close();
    rmSync(dataDir, { recursive: true, force: true });
  }
}
