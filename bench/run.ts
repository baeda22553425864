import { execFileSync, spawn } from 'node:child_process';
import { cpus, loadavg } from 'node:os';
import { createInterface } from 'node:readline';
import { runCatchup } from './catchup.js';
import { runContent } from './content.js';
import { runDynamodb } from './dynamodb.js';
import { runFanout } from './fanout.js';
import { runMatch } from './match.js';
import { runOutbox } from './outbox.js';
import { runPipeline } from './pipeline.js';
import { runReconcile } from './reconcile.js';
import { runRetention } from './retention.js';
import { printTable, type TargetCheck } from './util.js';

/**
 * `npm run bench` runs every suite in order; `npm run bench -- match` (or `pipeline`, `outbox`, `catchup`, `content`, `reconcile`, `fanout`, `dynamodb`, `retention`) runs one.
 * Each suite prints its own table; this prints the machine first and the targets last.
 */

const SUITES: Readonly<Record<string, () => Promise<TargetCheck[]>>> = {
  match: runMatch,
  pipeline: runPipeline,
  outbox: runOutbox,
  catchup: runCatchup,
  content: runContent,
  reconcile: runReconcile,
  fanout: runFanout,
  dynamodb: runDynamodb,
  retention: runRetention,
};

/** Marks the line on which a suite run in a child process hands its target checks back. */
const TARGETS_LINE = '@@targets ';

async function main(): Promise<void> {
  const args = process.argv.slice(2).filter((a) => a !== '--');
  if (args[0] === '--child') {
    // One suite in a fresh process: no heap, GC debt or sockets left over from an earlier suite.
    const checks = await (SUITES[args[1] ?? ''] as () => Promise<TargetCheck[]>)();
    console.log(`${TARGETS_LINE}${JSON.stringify(checks)}`);
    return;
  }
  const asked = args;
  const unknown = asked.filter((a) => !(a in SUITES));
  if (unknown.length > 0) {
    console.error(`unknown suite(s): ${unknown.join(', ')}; choose from ${Object.keys(SUITES).join(', ')}`);
    process.exit(2);
  }
  const names = asked.length === 0 ? Object.keys(SUITES) : asked;
  const cpu = cpus();
  console.log(
    `fhir-subscription-broker bench — ${new Date().toISOString()} — node ${process.version} — ${cpu.length} x ${cpu[0]?.model ?? 'cpu'}`,
  );
  console.log(`broker source: ${revision()}`);
  const load = (): string =>
    loadavg()
      .map((l) => l.toFixed(2))
      .join(' ');
  console.log(`load average at start: ${load()} (other processes on these cores skew every figure below)`);
  const started = performance.now();
  const checks: TargetCheck[] = [];
  for (const name of names) checks.push(...(await runInChild(name)));
  console.log('\n## targets\n');
  printTable([
    ['suite', 'target', 'measured', 'met'],
    ...checks.map((c) => [c.suite, c.target, c.measured, c.met ? 'yes' : 'NO']),
  ]);
  console.log(`\ntotal ${((performance.now() - started) / 1000).toFixed(1)} s; load average at end: ${load()}`);
}

function runInChild(name: string): Promise<TargetCheck[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'bench/run.ts', '--child', name], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let checks: TargetCheck[] = [];
    createInterface({ input: child.stdout }).on('line', (line) => {
      if (line.startsWith(TARGETS_LINE)) checks = JSON.parse(line.slice(TARGETS_LINE.length)) as TargetCheck[];
      else console.log(line);
    });
    child.on('error', reject);
    child.on('close', (code) =>
      code === 0 ? resolve(checks) : reject(new Error(`suite ${name} exited with ${code}`)),
    );
  });
}

/** The commit the figures belong to, and whether src/ differs from it. */
function revision(): string {
  try {
    const git = (...args: string[]): string => execFileSync('git', args, { encoding: 'utf8' }).trim();
    const dirty = git('status', '--porcelain', '--', 'src') !== '';
    return `${git('rev-parse', '--short', 'HEAD')}${dirty ? ' + uncommitted changes in src/' : ''}`;
  } catch {
    return 'unknown (not a git checkout)';
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
