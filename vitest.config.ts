import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['src/**/*.test.ts', 'test/**/*.test.ts', 'infra/test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    allowOnly: false,
    // Two test files at once (vitest picks one on a 2-core machine): most files spend their time
    // waiting on sockets, child processes, DynamoDB Local and timers, not on the CPU. The suite ran
    // 8.6 min with one, 5.7 min with two, every test passing in both.
    maxWorkers: 2,
    reporters: ['default'],
  },
});
