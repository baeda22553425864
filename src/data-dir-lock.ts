import { createHash } from 'node:crypto';
import { mkdirSync, realpathSync, unlinkSync } from 'node:fs';
import { connect, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

/**
 * One broker per data directory. Two processes on one SQLite store would each deliver every
 * pending notification (duplicates at the receivers) and each drive the subscriptions' statuses.
 * The lock is a Unix socket the holder listens on: the kernel closes it when the process dies,
 * however it dies (SIGKILL included), so a stale socket file only refuses connections and is
 * taken over, and a live holder answers and keeps the second broker out.
 */

export class DataDirInUseError extends Error {
  constructor(dataDir: string) {
    super(`another broker is running on ${dataDir}: stop it first, or give this one its own BROKER_DATA_DIR`);
    this.name = 'DataDirInUseError';
  }
}

/** Unix socket paths are limited to ~104 bytes: a long data dir gets one in the temp dir named by its hash. */
const MAX_SOCKET_PATH = 100;

export function lockPathOf(dataDir: string): string {
  const dir = realpathSync(resolve(dataDir));
  const inDir = join(dir, 'broker.lock');
  if (Buffer.byteLength(inDir) <= MAX_SOCKET_PATH) return inDir;
  return join(tmpdir(), `fhir-broker-${createHash('sha256').update(dir).digest('hex').slice(0, 24)}.lock`);
}

/** Holds the data dir until `release` (or the process's end). Rejects with DataDirInUseError. */
export async function lockDataDir(dataDir: string): Promise<{ release(): Promise<void> }> {
  mkdirSync(dataDir, { recursive: true });
  if (process.platform === 'win32') return { release: async () => {} };
  const path = lockPathOf(dataDir);
  let server = await listen(path).catch((err: NodeJS.ErrnoException) => err);
  if (server instanceof Error) {
    if (server.code !== 'EADDRINUSE') throw server;
    if (await answers(path)) throw new DataDirInUseError(dataDir);
    // Left by a process that died: nobody listens on it.
    unlinkSync(path);
    server = await listen(path);
  }
  const held = server;
  held.unref();
  return {
    release: () => new Promise<void>((done) => held.close(() => done())),
  };
}

function listen(path: string): Promise<Server> {
  return new Promise((resolveListen, reject) => {
    const server = createServer((socket) => socket.end());
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolveListen(server);
    });
  });
}

function answers(path: string): Promise<boolean> {
  return new Promise((done) => {
    const socket = connect(path);
    socket.once('connect', () => {
      socket.destroy();
      done(true);
    });
    socket.once('error', () => done(false));
  });
}
