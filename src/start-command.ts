import { readFileSync } from 'node:fs';

/**
 * The Node flags `npm start` runs the broker with: package.json `start` is `exec node <flags>
 * --import tsx src/main.ts` (`exec`: node replaces the shell npm starts, so the SIGTERM npm passes
 * on reaches node; without it node outlived a stopped npm). The bench and the tests that start a
 * real broker process read the flags here, so that they run the process a user runs.
 */
export function startNodeFlags(): string[] {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
    scripts: { start: string };
  };
  return nodeFlagsOf(pkg.scripts.start);
}

/** The flags of an `exec node <flags> --import tsx src/main.ts` command line (`exec` optional). */
export function nodeFlagsOf(command: string): string[] {
  const all = command.trim().split(/\s+/);
  const words = all[0] === 'exec' ? all.slice(1) : all;
  const tsx = words.indexOf('--import');
  if (words[0] !== 'node' || tsx === -1 || words[tsx + 1] !== 'tsx' || words[tsx + 2] !== 'src/main.ts') {
    throw new Error(`expected "node <flags> --import tsx src/main.ts", got: ${command}`);
  }
  return words.slice(1, tsx);
}
