import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, expect, it } from 'vitest';
import { startBroker } from './support/broker-process.js';

/**
 * `npm start` as a service manager or a container runtime stops it: SIGTERM to npm alone, not to
 * its process group. The broker must hear it and shut down, not be left running as an orphan.
 */

let npm: ChildProcess | undefined;
afterEach(() => {
  npm?.kill('SIGKILL');
});

/** The pids of `pid`'s children (Linux). */
function childrenOf(pid: number): number[] {
  const file = `/proc/${pid}/task/${pid}/children`;
  return existsSync(file)
    ? readFileSync(file, 'utf8')
        .trim()
        .split(/\s+/)
        .filter((s) => s !== '')
        .map(Number)
    : [];
}

it('stops the broker gracefully when npm start gets SIGTERM', async () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'fsb-npm-'));
  npm = spawn('npm', ['start', '--silent'], {
    env: { ...process.env, PORT: '0', HOST: '127.0.0.1', BROKER_DATA_DIR: dataDir, BROKER_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const child = npm;
  const logs: string[] = [];
  const listening = new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`npm start exited early (${code})`)));
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
      logs.push(line);
      if (line.includes('"msg":"listening"')) resolve();
    });
  });
  await listening;
  const [node] = childrenOf(child.pid as number);
  expect(node).toBeDefined();
  expect(readFileSync(`/proc/${node}/cmdline`, 'utf8').split('\0')[0]).toMatch(/node$/);

  // 'close': npm has exited and its output (the broker's) has been read to the end.
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  child.kill('SIGTERM');
  await exited;
  // The broker was npm's own child, got the signal, and is gone (npm reaped it) after its clean stop.
  for (let i = 0; i < 100 && existsSync(`/proc/${node}`); i++) await new Promise((r) => setTimeout(r, 50));
  expect(existsSync(`/proc/${node}`)).toBe(false);
  expect(logs.some((l) => l.includes('"msg":"shutting down"') && l.includes('SIGTERM'))).toBe(true);
});

it('names HOST and PORT when it cannot listen there', async () => {
  await expect(startBroker({ HOST: '999.1.1.1' })).rejects.toThrow(/cannot listen on HOST=999\.1\.1\.1 PORT=0/);
});
