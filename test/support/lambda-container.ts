import { type ChildProcess, fork } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';

/**
 * One Lambda function's execution environment: a Node process of its own, with only the
 * environment it is given, that imports the real entry module (its cold start) and runs the
 * handler for each `invoke`. A process per function, because the AWS SDK reads endpoints and
 * credentials from the environment lazily: functions sharing a process could not each have their own.
 */

const RUNTIME = fileURLToPath(new URL('./lambda-runtime.ts', import.meta.url));
// 30 s: a cold start imports tsx, the AWS SDK and the broker.
const READY_TIMEOUT_MS = 30_000;

type Reply = { ready: true } | { id: number; result: unknown } | { id: number; error: string };

export class LambdaContainer {
  readonly #child: ChildProcess;
  readonly #pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  readonly #output: string[] = [];
  #next = 0;
  #exited = false;

  private constructor(child: ChildProcess) {
    this.#child = child;
    child.stdout?.on('data', (d: Buffer) => this.#output.push(d.toString()));
    child.stderr?.on('data', (d: Buffer) => this.#output.push(d.toString()));
    child.on('message', (reply: Reply) => {
      if ('ready' in reply) return;
      const waiting = this.#pending.get(reply.id);
      this.#pending.delete(reply.id);
      if ('error' in reply) waiting?.reject(new Error(`handler failed: ${reply.error}`));
      else waiting?.resolve(reply.result);
    });
    child.on('exit', (code, signal) => {
      this.#exited = true;
      const err = new Error(`function process exited (${code ?? signal}):\n${this.output}`);
      for (const waiting of this.#pending.values()) waiting.reject(err);
      this.#pending.clear();
    });
  }

  /** Starts the process and resolves once the entry module is imported (its broker still starting). */
  static async start(entry: string, exportName: string, env: Readonly<Record<string, string>>) {
    const child = fork(RUNTIME, [entry, exportName], {
      execArgv: ['--import', 'tsx'],
      env: { PATH: process.env.PATH ?? '', ...env },
      stdio: ['ignore', 'pipe', 'pipe', 'ipc'],
    });
    const container = new LambdaContainer(child);
    const ready = new Promise<void>((resolve, reject) => {
      child.on('message', (reply: Reply) => {
        if ('ready' in reply) resolve();
      });
      child.once('exit', () => reject(new Error(`function process exited before it was ready:\n${container.output}`)));
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), READY_TIMEOUT_MS);
    try {
      await ready;
    } finally {
      clearTimeout(timer);
    }
    return container;
  }

  /** What the process wrote to stdout and stderr (its logs). */
  get output(): string {
    return this.#output.join('');
  }

  invoke<T = unknown>(event: unknown): Promise<T> {
    if (this.#exited) return Promise.reject(new Error(`function process has exited:\n${this.output}`));
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.#child.send({ id, event });
    });
  }

  async stop(): Promise<void> {
    if (this.#exited) return;
    const exited = once(this.#child, 'exit');
    this.#child.kill('SIGTERM');
    await exited;
  }
}
