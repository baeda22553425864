import { describe, expect, it } from 'vitest';
import { nodeFlagsOf, startNodeFlags } from './start-command.js';

describe('npm start command', () => {
  it('runs the broker with V8 collecting garbage on its own threads (package.json start)', () => {
    expect(startNodeFlags()).toContain('--single-threaded-gc');
  });

  it('reads the flags between node and --import tsx src/main.ts', () => {
    expect(nodeFlagsOf('node --import tsx src/main.ts')).toEqual([]);
    expect(nodeFlagsOf(' node  --a --b=1 --import tsx src/main.ts ')).toEqual(['--a', '--b=1']);
  });

  it.each(['tsx src/main.ts', 'node --a src/main.ts', 'node --import tsx bench/forwarder.ts'])(
    'refuses a start command of another shape: %s',
    (command) => {
      expect(() => nodeFlagsOf(command)).toThrow(/expected "node <flags> --import tsx src\/main.ts"/);
    },
  );
});
