import { lstatSync, mkdirSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { ConfigError, fsReason } from './config.js';

/**
 * One broker per data directory. Two processes on one SQLite store would each deliver every
 * pending notification (duplicates at the receivers) and each drive the subscriptions' statuses.
 * The lock is an exclusive SQLite lock on `broker.lock` (a small database of its own): taken in one
 * atomic step by the kernel's file locking, held while the connection is open, and released by the
 * kernel when the process ends, however it ends (SIGKILL included). A second broker's write meets
 * SQLITE_BUSY at once.
 */

export class DataDirInUseError extends Error {
  constructor(dataDir: string) {
    super(`another broker is running on ${dataDir}: stop it first, or give this one its own BROKER_DATA_DIR`);
    this.name = 'DataDirInUseError';
  }
}

export const LOCK_FILE = 'broker.lock';

/** Creates the data dir (and its parents) if need be; a path it cannot be made at names BROKER_DATA_DIR. */
export function makeDataDir(dataDir: string): void {
  try {
    // Only its owner's: it holds the store (webhook secrets) and credentials.json.
    mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw new ConfigError('BROKER_DATA_DIR', `cannot create the directory ${dataDir}: ${fsReason(err)}`);
  }
}

/** Holds the data dir until `release` (or the process's end). Throws DataDirInUseError. */
export function lockDataDir(dataDir: string): { release(): void } {
  makeDataDir(dataDir);
  const path = join(dataDir, LOCK_FILE);
  // A Unix socket of that name is what an earlier build of this session left behind: not a lock.
  if (lstatSync(path, { throwIfNoEntry: false })?.isSocket() === true) unlinkSync(path);
  const db = new Database(path, { timeout: 0 });
  try {
    // In exclusive locking mode the lock a write takes is kept until the connection closes. The
    // exclusive lock is asked for first, in one step, so that two starters never both hold a read lock.
    db.pragma('locking_mode = EXCLUSIVE');
    db.exec('BEGIN EXCLUSIVE');
    db.exec('CREATE TABLE IF NOT EXISTS holder (pid INTEGER)');
    db.prepare('INSERT OR REPLACE INTO holder (rowid, pid) VALUES (1, ?)').run(process.pid);
    db.exec('COMMIT');
  } catch (err) {
    db.close();
    if ((err as { code?: string }).code === 'SQLITE_BUSY') throw new DataDirInUseError(dataDir);
    throw err;
  }
  return { release: () => db.close() };
}
