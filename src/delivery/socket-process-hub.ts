import { type ChildProcess, fork } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import { extname } from 'node:path';
import type { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import {
  type HubLimits,
  type LocalSockets,
  type MessageHandler,
  remoteAddressOf,
  UnboundByAddress,
} from './local-websocket-hub.js';
import { dialectOf } from './medplum-dialect.js';
import type { FromSocketProcess, SocketProcessConfig, ToSocketProcess } from './socket-process-protocol.js';
import type { Connection } from './websocket-channel.js';
import { CLOSE, type ManyOutcome, type SendOutcome } from './websocket-port.js';

/**
 * The local WebSocket layer spread over N socket processes (`BROKER_WS_PROCESSES`). The main
 * process checks path and auth of each `/ws` upgrade request and hands the raw TCP socket to a
 * child (`child.send(msg, socket)`, round robin); the child completes the handshake and owns the
 * connection from then on (limits, pings, writes). A fan-out is one IPC message per child with
 * the connection ids it owns (`sendMany`), so the per-socket write syscalls run on the children's
 * cores instead of the main thread. Messages to one child keep their order, so do a connection's
 * frames. A child that dies takes its connections with it (reported closed) and is replaced.
 */

const ENTRY = fileURLToPath(new URL(`./socket-process${extname(fileURLToPath(import.meta.url))}`, import.meta.url));

type Reply = SendOutcome | ManyOutcome | boolean;

interface Child {
  readonly index: number;
  readonly process: ChildProcess;
  readonly pending: Map<number, (v: Reply | undefined) => void>;
  readonly connections: Set<string>;
  alive: boolean;
}

export class SocketProcessHub implements LocalSockets {
  readonly #config: SocketProcessConfig;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #children: Child[] = [];
  /**
   * Connection id → its child, the connection the channel sees, its remote address, and whether
   * it holds a binding. Counted here, not in the children: the upgrade check runs in this process.
   */
  readonly #connections = new Map<string, { child: Child; conn: Connection; address: string; bound: boolean }>();
  readonly #unbound = new UnboundByAddress();
  #handler: MessageHandler | undefined;
  #next = 0;
  #rq = 0;
  #closing = false;

  private constructor(deps: {
    processes: number;
    logger: Logger;
    metrics: Metrics;
    limits: Partial<HubLimits>;
    logLevel: string;
  }) {
    this.#config = { limits: deps.limits, logLevel: deps.logLevel };
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
    deps.metrics.gauge('broker_websocket_connections', () => this.#connections.size);
  }

  /** Forks `processes` socket processes and waits until each is ready. */
  static async start(deps: {
    processes: number;
    logger: Logger;
    metrics: Metrics;
    limits?: Partial<HubLimits>;
    logLevel?: string;
  }): Promise<SocketProcessHub> {
    const hub = new SocketProcessHub({ ...deps, limits: deps.limits ?? {}, logLevel: deps.logLevel ?? 'info' });
    await Promise.all(Array.from({ length: deps.processes }, (_, i) => hub.#spawn(i)));
    return hub;
  }

  get size(): number {
    return this.#connections.size;
  }

  unboundFrom(address: string): number {
    return this.#unbound.of(address);
  }

  get pids(): number[] {
    return this.#children.map((c) => c.process.pid ?? 0);
  }

  handle(handler: MessageHandler): void {
    this.#handler = handler;
  }

  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer, owner: string | undefined): void {
    const child = this.#pick();
    if (child === undefined) {
      socket.end('HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    const id = randomUUID();
    const address = remoteAddressOf(req);
    this.#connections.set(id, {
      child,
      conn: {
        id,
        ...(owner === undefined ? {} : { apiOwner: owner }),
        ...(dialectOf(req) === undefined ? {} : { dialect: 'medplum' as const }),
      },
      address,
      bound: false,
    });
    // Counted from the hand-off: the child reports a refused handshake as closed (`#gone`).
    this.#unbound.add(address);
    child.connections.add(id);
    const rest = stopReading(socket as Socket);
    // The API key was checked here; the child needs only what the WebSocket handshake reads.
    const { authorization: _authorization, cookie: _cookie, ...headers } = req.headers;
    const msg: ToSocketProcess = {
      t: 'up',
      id,
      ...(owner === undefined ? {} : { owner }),
      url: req.url ?? '/ws',
      headers,
      head: (rest === undefined ? head : Buffer.concat([head, rest])).toString('base64'),
    };
    child.process.send(msg, socket as Socket, (err) => {
      if (err === null || err === undefined) return;
      this.#logger.warn('websocket hand-off failed', { connection: id, err });
      socket.destroy();
      this.#gone(id);
    });
  }

  async send(connectionId: string, text: string): Promise<SendOutcome> {
    const entry = this.#connections.get(connectionId);
    if (entry === undefined) return 'gone';
    const v = await this.#request(entry.child, (rq) => ({ t: 'send', rq, id: connectionId, text }));
    return typeof v === 'string' ? v : 'gone';
  }

  async sendMany(connectionIds: readonly string[], text: string): Promise<ManyOutcome> {
    const byChild = new Map<Child, string[]>();
    const gone: string[] = [];
    for (const id of connectionIds) {
      const child = this.#connections.get(id)?.child;
      if (child === undefined) {
        gone.push(id);
        continue;
      }
      let ids = byChild.get(child);
      if (ids === undefined) {
        ids = [];
        byChild.set(child, ids);
      }
      ids.push(id);
    }
    const replies = await Promise.all(
      [...byChild].map(([child, ids]) => this.#request(child, (rq) => ({ t: 'many', rq, ids, text }))),
    );
    let sent = 0;
    for (const [i, [, ids]] of [...byChild].entries()) {
      const v = replies[i];
      if (typeof v === 'object') {
        sent += v.sent;
        gone.push(...v.gone);
      } else gone.push(...ids);
    }
    return { sent, gone };
  }

  async close(connectionId: string, code: number, reason: string): Promise<void> {
    const entry = this.#connections.get(connectionId);
    if (entry === undefined || !entry.child.alive) return;
    this.#post(entry.child, { t: 'close', id: connectionId, code, reason });
  }

  /** The child owns the socket and its buffer: asked there (a request is answered in order after the sends before it). */
  async drained(connectionId: string): Promise<void> {
    const entry = this.#connections.get(connectionId);
    if (entry === undefined) return;
    await this.#request(entry.child, (rq) => ({ t: 'drained?', rq, id: connectionId }));
  }

  /** The child runs the bind window; it hears each change of state (one IPC message, not one per bind). */
  markBound(connectionId: string, bound: boolean): void {
    const entry = this.#connections.get(connectionId);
    if (entry === undefined || entry.bound === bound || !entry.child.alive) return;
    entry.bound = bound;
    if (bound) this.#unbound.remove(entry.address);
    else this.#unbound.add(entry.address);
    this.#post(entry.child, { t: 'bound', id: connectionId, bound });
  }

  async isOpen(connectionId: string): Promise<boolean> {
    const entry = this.#connections.get(connectionId);
    if (entry === undefined) return false;
    return (await this.#request(entry.child, (rq) => ({ t: 'open?', rq, id: connectionId }))) === true;
  }

  /** Close every socket (shutdown); the children exit when the main process does. */
  closeAll(code: number = CLOSE.goingAway, reason = 'broker shutting down'): void {
    this.#closing = true;
    for (const child of this.#children) if (child.alive) this.#post(child, { t: 'closeAll', code, reason });
  }

  #pick(): Child | undefined {
    for (let i = 0; i < this.#children.length; i++) {
      const child = this.#children[(this.#next + i) % this.#children.length];
      if (child?.alive) {
        this.#next = (child.index + 1) % this.#children.length;
        return child;
      }
    }
    return undefined;
  }

  #post(child: Child, msg: ToSocketProcess): void {
    try {
      child.process.send(msg);
    } catch (err) {
      this.#logger.warn('socket process unreachable', { child: child.index, err: err as Error });
    }
  }

  #request(child: Child, build: (rq: number) => ToSocketProcess): Promise<Reply | undefined> {
    if (!child.alive) return Promise.resolve(undefined);
    const rq = ++this.#rq;
    return new Promise((resolve) => {
      child.pending.set(rq, resolve);
      this.#post(child, build(rq));
    });
  }

  async #spawn(index: number): Promise<void> {
    const proc = fork(ENTRY, [JSON.stringify(this.#config)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const child: Child = { index, process: proc, pending: new Map(), connections: new Set(), alive: true };
    this.#children[index] = child;
    const ready = new Promise<void>((resolve, reject) => {
      proc.once('error', reject);
      proc.once('exit', (code) => reject(new Error(`socket process ${index} exited with ${code} before ready`)));
      proc.on('message', (m: FromSocketProcess) => {
        if (m.t === 'ready') resolve();
      });
    });
    proc.on('message', (m: FromSocketProcess) => this.#onChildMessage(child, m));
    proc.on('exit', (code, signal) => this.#onChildExit(child, code, signal));
    await ready;
  }

  #onChildMessage(child: Child, m: FromSocketProcess): void {
    switch (m.t) {
      case 'msg': {
        const entry = this.#connections.get(m.id);
        if (entry === undefined || this.#handler === undefined) return;
        this.#handler.onMessage(entry.conn, m.text).catch((err: unknown) => {
          this.#logger.error('websocket handler failed', { connection: m.id, err: err as Error });
          void this.close(m.id, CLOSE.goingAway, 'internal error');
        });
        return;
      }
      case 'closed':
        this.#gone(m.id);
        return;
      case 're': {
        const resolve = child.pending.get(m.rq);
        child.pending.delete(m.rq);
        resolve?.(m.v);
        return;
      }
      case 'inc':
        this.#metrics.inc(m.name, m.labels, m.by);
        return;
      case 'ready':
        return;
    }
  }

  #gone(id: string): void {
    const entry = this.#connections.get(id);
    if (entry === undefined) return;
    this.#connections.delete(id);
    entry.child.connections.delete(id);
    if (!entry.bound) this.#unbound.remove(entry.address);
    this.#handler?.onClose(id).catch((err: unknown) => {
      this.#logger.error('websocket close handler failed', { connection: id, err: err as Error });
    });
  }

  #onChildExit(child: Child, code: number | null, signal: NodeJS.Signals | null): void {
    child.alive = false;
    for (const resolve of child.pending.values()) resolve(undefined);
    child.pending.clear();
    for (const id of [...child.connections]) this.#gone(id);
    if (this.#closing) return;
    this.#logger.error('socket process exited; starting another', { child: child.index, code, signal });
    const restart = setTimeout(() => {
      // Shut down meanwhile: nothing to serve.
      if (this.#closing) return;
      this.#spawn(child.index).catch((err: unknown) => {
        this.#logger.error('socket process failed to start', { child: child.index, err: err as Error });
      });
    }, 1000);
    restart.unref();
  }
}

/**
 * The HTTP server left the upgraded socket reading. Until the hand-off completes and this process
 * closes its copy of the descriptor, both processes would read the same connection and a client
 * frame could land here (and be dropped). Stop reading first (`child.send` does not), and pass on
 * whatever this side had already buffered.
 */
function stopReading(socket: Socket): Buffer | undefined {
  const handle = (socket as unknown as { _handle?: { reading?: boolean; readStop?: () => number } })._handle;
  const stop = (): void => {
    if (handle?.readStop === undefined) return;
    handle.reading = false;
    handle.readStop();
  };
  stop();
  if (socket.readableLength === 0) return undefined;
  const rest = socket.read(socket.readableLength) as Buffer | null;
  // read() may have asked the handle to read again.
  stop();
  return rest ?? undefined;
}
