import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';

/**
 * Temporary directories for a test file, removed once it has run (a suite run otherwise leaves
 * dozens of data dirs in the system's temp dir). Hooks registered after this module's run before
 * it, so a broker a file stops in its own `afterAll` is gone before its directory is. The hook is
 * registered when a test file first imports this module, once per file under vitest's default
 * `isolate: true` (with `--no-isolate` only the first file of a worker would clean up).
 */

const made: string[] = [];
afterAll(() => {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A new directory under the temp dir, named `<prefix>XXXXXX`. */
export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}
