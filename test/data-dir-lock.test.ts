import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DataDirInUseError, lockDataDir, lockPathOf } from '../src/data-dir-lock.js';
import { type BrokerProcess, newDataDir, startBroker } from './support/broker-process.js';

/** One broker per data directory: a second is refused while the first lives, however the first ends. */

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

describe('lockDataDir', () => {
  it('refuses a second holder while the first holds it, and lets one in after release', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-lock-'));
    const first = await lockDataDir(dir);
    await expect(lockDataDir(dir)).rejects.toBeInstanceOf(DataDirInUseError);
    await first.release();
    const second = await lockDataDir(dir);
    await second.release();
  });

  it('takes over the lock of a process that was killed (SIGKILL leaves the socket file behind)', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-lock-'));
    const path = lockPathOf(dir);
    const holder = spawn(process.execPath, [
      '-e',
      `require('net').createServer().listen(${JSON.stringify(path)}, () => console.log('held'))`,
    ]);
    await once(holder.stdout, 'data');
    await expect(lockDataDir(dir)).rejects.toBeInstanceOf(DataDirInUseError);
    holder.kill('SIGKILL');
    await once(holder, 'exit');
    expect(existsSync(path)).toBe(true);
    const lock = await lockDataDir(dir);
    await lock.release();
  });

  it('keeps the socket in the temp dir, named by the data dir, when the data dir path is too long for one', () => {
    const deep = join(mkdtempSync(join(tmpdir(), 'fsb-lock-')), 'x'.repeat(60), 'y'.repeat(60));
    mkdirSync(deep, { recursive: true });
    const path = lockPathOf(deep);
    expect(path.startsWith(tmpdir())).toBe(true);
    expect(path).toMatch(/fhir-broker-[0-9a-f]{24}\.lock$/);
    expect(lockPathOf(deep)).toBe(path);
  });
});

describe('a broker whose database file is deleted', () => {
  it('stops acknowledging and exits (70) so that a restart recovers, instead of taking events into a lost file', async () => {
    const dataDir = newDataDir();
    const broker = await startBroker({}, dataDir);
    cleanups.push(() => broker.kill('SIGKILL'));
    const exited = new Promise((resolve) => broker.child.once('exit', resolve));
    for (const f of ['broker.sqlite3', 'broker.sqlite3-wal', 'broker.sqlite3-shm'])
      rmSync(join(dataDir, f), { force: true });
    const health = await fetch(`${broker.url}/healthz`).catch(() => undefined);
    expect(health?.status ?? 503).toBe(503);
    await broker.waitForLog((r) => r.msg === 'the SQLite store failed; exiting so that a restart recovers', 'the exit');
    expect(await exited).toBe(70);
  });
});

describe('npm start on a data dir in use', () => {
  it('refuses to start a second broker on the same data dir, and starts after the first was killed', async () => {
    const dataDir = newDataDir();
    const first: BrokerProcess = await startBroker({}, dataDir);
    cleanups.push(() => first.kill('SIGKILL'));
    await expect(startBroker({}, dataDir)).rejects.toThrow(/another broker is running on/);
    await first.kill('SIGKILL');
    const again = await startBroker({}, dataDir);
    cleanups.push(() => again.kill('SIGTERM'));
    expect((await fetch(`${again.url}/healthz`)).status).toBe(200);
  });
});
