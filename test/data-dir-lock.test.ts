import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, existsSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ConfigError } from '../src/config.js';
import { DataDirInUseError, LOCK_FILE, lockDataDir } from '../src/data-dir-lock.js';
import { SqliteStore } from '../src/store/sqlite/sqlite-store.js';
import { type BrokerProcess, newDataDir, startBroker } from './support/broker-process.js';
import { tempDir } from './support/temp-dirs.js';

/** One broker per data directory: a second is refused while the first lives, however the first ends. */

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/**
 * A child process that takes the lock with the real `lockDataDir` and holds it `holdMs`; `said` is
 * its first line: `HELD`, or the name of the error it met.
 */
function lockInChild(dir: string, holdMs: number): { child: ChildProcess; said: Promise<string> } {
  const module = join(process.cwd(), 'src', 'data-dir-lock.ts');
  const script = `const { lockDataDir } = await import(${JSON.stringify(module)});
    try { lockDataDir(${JSON.stringify(dir)}); console.log('HELD'); setTimeout(() => process.exit(0), ${holdMs}); }
    catch (e) { console.log(e.name); process.exit(0); }`;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script]);
  const said = new Promise<string>((resolve) => {
    let out = '';
    child.stdout.on('data', (c: Buffer) => {
      out += c.toString();
      if (out.includes('\n')) resolve(out.trim());
    });
    child.once('exit', () => resolve(out.trim()));
  });
  return { child, said };
}

async function kill(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGKILL');
  await exited;
}

describe('lockDataDir', () => {
  it('refuses a second holder while the first holds it, and lets one in after release', () => {
    const dir = tempDir('fsb-lock-');
    const first = lockDataDir(dir);
    expect(() => lockDataDir(dir)).toThrow(DataDirInUseError);
    first.release();
    lockDataDir(dir).release();
  });

  it('is free again once its holder was killed (the kernel drops the lock with the process)', async () => {
    const dir = tempDir('fsb-lock-');
    const holder = lockInChild(dir, 60_000);
    expect(await holder.said).toBe('HELD');
    expect(() => lockDataDir(dir)).toThrow(DataDirInUseError);
    holder.child.kill('SIGKILL');
    await once(holder.child, 'exit');
    lockDataDir(dir).release();
  });

  it('lets exactly one of many brokers in at once, on a new lock file and on one left from before', async () => {
    for (const leftOver of [false, true]) {
      const dir = tempDir('fsb-lock-');
      if (leftOver) lockDataDir(dir).release();
      // Each holds until all have spoken (killed then): under load one started late must still find
      // the first holding, not a lock its holder already let go of.
      const children = Array.from({ length: 5 }, () => lockInChild(dir, 120_000));
      for (const { child } of children) cleanups.push(() => kill(child));
      const outputs = await Promise.all(children.map((c) => c.said));
      await Promise.all(children.map(({ child }) => kill(child)));
      expect(
        outputs.filter((o) => o === 'HELD'),
        `left over: ${leftOver}`,
      ).toHaveLength(1);
      expect(outputs.filter((o) => o !== 'HELD').every((o) => o === 'DataDirInUseError')).toBe(true);
    }
  });

  it('names BROKER_DATA_DIR when the directory cannot be made there', () => {
    const file = join(tempDir('fsb-lock-'), 'a-file');
    writeFileSync(file, '');
    const dir = join(file, 'x');
    expect(() => lockDataDir(dir)).toThrow(ConfigError);
    expect(() => lockDataDir(dir)).toThrow(
      `BROKER_DATA_DIR: cannot create the directory ${dir}: not a directory (ENOTDIR)`,
    );
  });

  it('replaces a Unix socket an earlier build left at broker.lock', async () => {
    const dir = tempDir('fsb-lock-');
    const holder = spawn(process.execPath, [
      '-e',
      `require('net').createServer().listen(${JSON.stringify(join(dir, LOCK_FILE))}, () => console.log('listening'))`,
    ]);
    await once(holder.stdout, 'data');
    holder.kill('SIGKILL');
    await once(holder, 'exit');
    lockDataDir(dir).release();
  });
});

describe('data dir permissions', () => {
  const modeOf = (path: string) => statSync(path).mode & 0o777;

  it("makes the data dir its owner's alone, and the database with its WAL files 0600 (they hold webhook secrets)", async () => {
    const parent = tempDir('fsb-modes-');
    const dir = join(parent, 'new', 'data');
    lockDataDir(dir).release();
    expect(modeOf(dir)).toBe(0o700);
    const store = new SqliteStore(join(parent, 'other'));
    await store.close();
    expect(modeOf(join(parent, 'other'))).toBe(0o700);
    const file = join(parent, 'other', 'broker.sqlite3');
    const files = [file, `${file}-wal`, `${file}-shm`].filter((f) => existsSync(f));
    expect(files).toContain(file);
    for (const f of files) expect(modeOf(f), f).toBe(0o600);
  });

  it('tightens a database (and WAL files) an earlier build left readable by others', async () => {
    const dir = tempDir('fsb-modes-');
    const file = join(dir, 'broker.sqlite3');
    await new SqliteStore(dir).close();
    writeFileSync(`${file}-wal`, '');
    for (const f of [file, `${file}-wal`]) chmodSync(f, 0o644);
    const store = new SqliteStore(dir);
    for (const f of [file, `${file}-wal`]) expect(modeOf(f), f).toBe(0o600);
    expect(modeOf(`${file}-shm`)).toBe(0o600);
    await store.close();
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
    // The broker may exit before it answers (then the request fails); it must not leave it hanging.
    // Bounded generously: an exit waits for the SQLite threads, and one inside an fsync on a busy
    // disk (CI runs this right after `npm ci` wrote node_modules) holds it for seconds.
    const health = await fetch(`${broker.url}/healthz`, { signal: AbortSignal.timeout(30_000) }).catch((err: Error) =>
      err.name === 'TimeoutError' ? err : undefined,
    );
    expect(health instanceof Error ? 'no answer within 30 s' : (health?.status ?? 503)).toBe(503);
    await broker.waitForLog((r) => r.msg === 'the SQLite store failed; exiting so that a restart recovers', 'the exit');
    const timeout = new Promise((resolve) =>
      setTimeout(() => resolve('still running 10 s after its exit log'), 10_000),
    );
    expect(await Promise.race([exited, timeout])).toBe(70);
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
