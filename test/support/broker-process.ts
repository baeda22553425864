import { type ChildProcess, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { afterAll } from 'vitest';
import { startNodeFlags } from '../../src/start-command.js';
import { tempDir } from './temp-dirs.js';
import { Waiters } from './waiters.js';

/**
 * Starts the real broker as `npm start` runs it (`node <flags> --import tsx src/main.ts`) on port 0
 * and learns its port from the `listening` log line. Kill it with SIGKILL to simulate a crash, or stop it with SIGTERM.
 */

export const API_KEYS = { alice: 'alice-token-0123456789abcdef', bob: 'bob-token-0123456789abcdef01' } as const;
export const INGEST_TOKEN = 'ingest-token-0123456789abcdef';

export interface BrokerProcess {
  readonly url: string;
  readonly dataDir: string;
  readonly child: ChildProcess;
  readonly logs: Record<string, unknown>[];
  readonly stderr: string[];
  kill(signal?: NodeJS.Signals): Promise<number | null>;
  /** Resolves when a log record satisfying `predicate` has been written (woken per line, no polling). */
  waitForLog(
    predicate: (rec: Record<string, unknown>) => boolean,
    what: string,
    timeoutMs?: number,
  ): Promise<Record<string, unknown>>;
  /** Resolves when the subscription has moved to `status` (from the status-change log line). */
  waitForStatus(id: string, status: string, timeoutMs?: number): Promise<void>;
}

/** Brokers started by the test file importing this: any still running once it has run are killed. */
const children: ChildProcess[] = [];
afterAll(async () => {
  // Registered after temp-dirs' hook, so this runs first: nothing writes into a dir being removed.
  await Promise.all(
    children.splice(0).map((child) =>
      child.exitCode !== null || child.signalCode !== null
        ? undefined
        : new Promise((resolve) => {
            child.once('exit', resolve);
            child.kill('SIGKILL');
          }),
    ),
  );
});

/** A data dir for a broker process, removed after the test file. */
export function newDataDir(): string {
  return tempDir('fsb-');
}

export async function startBroker(env: Record<string, string> = {}, dataDir = newDataDir()): Promise<BrokerProcess> {
  const child = spawn(process.execPath, [...startNodeFlags(), '--import', 'tsx', 'src/main.ts'], {
    cwd: process.cwd(),
    env: {
      PATH: process.env.PATH ?? '',
      PORT: '0',
      HOST: '127.0.0.1',
      BROKER_DATA_DIR: dataDir,
      BROKER_API_KEYS: `alice:${API_KEYS.alice},bob:${API_KEYS.bob}`,
      BROKER_INGEST_TOKEN: INGEST_TOKEN,
      BROKER_ENDPOINT_ALLOWLIST: '127.0.0.1',
      BROKER_LOG_LEVEL: 'info',
      // `BROKER_WS_PROCESSES=2 npx vitest run` runs every real-process test over socket processes.
      ...(process.env.BROKER_WS_PROCESSES === undefined
        ? {}
        : { BROKER_WS_PROCESSES: process.env.BROKER_WS_PROCESSES }),
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  const logs: Record<string, unknown>[] = [];
  const stderr: string[] = [];
  const waiters = new Waiters();
  createInterface({ input: child.stderr! }).on('line', (l) => stderr.push(l));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`broker did not start: ${stderr.join('\n')}`)), 30_000);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      let rec: Record<string, unknown>;
      try {
        rec = JSON.parse(line) as Record<string, unknown>;
      } catch {
        return;
      }
      logs.push(rec);
      waiters.wake();
      if (rec.msg === 'listening') {
        clearTimeout(timer);
        resolve(rec.port as number);
      }
    });
    void exited.then((code) => reject(new Error(`broker exited with ${code}: ${stderr.join('\n')}`)));
  });
  // PORT=0: the public URL must name the real port, so the test passes it back on restarts too.
  const waitForLog = (
    predicate: (rec: Record<string, unknown>) => boolean,
    what: string,
    timeoutMs = 15_000,
  ): Promise<Record<string, unknown>> => waiters.until(() => logs.find(predicate), `log: ${what}`, timeoutMs);
  return {
    url: `http://127.0.0.1:${port}`,
    waitForLog,
    async waitForStatus(id: string, status: string, timeoutMs?: number) {
      await waitForLog(
        (r) => r.msg === 'subscription status changed' && r.subscription === id && r.to === status,
        `Subscription/${id} → ${status}`,
        timeoutMs,
      );
    },
    dataDir,
    child,
    logs,
    stderr,
    async kill(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill(signal);
      return exited;
    },
  };
}
