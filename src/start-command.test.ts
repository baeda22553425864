import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { nodeFlagsOf, startNodeFlags } from './start-command.js';

describe('npm start command', () => {
  it('runs the broker with V8 collecting garbage on its own threads (package.json start)', () => {
    expect(startNodeFlags()).toContain('--single-threaded-gc');
  });

  it('runs node in place of the shell, so that a SIGTERM to npm reaches it (package.json start)', () => {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
      scripts: { start: string };
    };
    expect(pkg.scripts.start).toMatch(/^exec node /);
  });

  it('reads the flags between node and --import tsx src/main.ts', () => {
    expect(nodeFlagsOf('node --import tsx src/main.ts')).toEqual([]);
    expect(nodeFlagsOf('exec node --a --import tsx src/main.ts')).toEqual(['--a']);
    expect(nodeFlagsOf(' node  --a --b=1 --import tsx src/main.ts ')).toEqual(['--a', '--b=1']);
  });

  it.each(['tsx src/main.ts', 'node --a src/main.ts', 'node --import tsx bench/forwarder.ts'])(
    'refuses a start command of another shape: %s',
    (command) => {
      expect(() => nodeFlagsOf(command)).toThrow(/expected "node <flags> --import tsx src\/main.ts"/);
    },
  );
});
