import { randomUUID } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { type WebSocket, WebSocketServer } from 'ws';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import { dialectOf } from './medplum-dialect.js';
import type { Connection } from './websocket-channel.js';
import { CLOSE, type ManyOutcome, type SendOutcome, type WebSocketPort } from './websocket-port.js';

/**
 * The local WebSocket adapter: sockets accepted on the broker's own port. Sockets are hostile by
 * default: capped message size (set on the server), a message-rate cap, a bounded send buffer
 * (a slow reader is closed rather than let memory grow), ping/pong with dead-socket cleanup, a
 * socket that holds no binding is closed after the bind window, and every callback is guarded so
 * one bad socket never affects another.
 */

// 16 KiB: a bind message with a token is a few hundred bytes; nothing a client sends is larger.
export const MAX_CLIENT_MESSAGE_BYTES = 16 * 1024;

export interface HubLimits {
  /** Bytes a socket may have queued for sending before it counts as a slow consumer. */
  readonly maxBufferedBytes: number;
  readonly pingIntervalMs: number;
  /** Client messages per second (a token bucket, refilled at this rate up to `messageBurst`). */
  readonly maxMessagesPerSecond: number;
  /**
   * Client messages at once: the bucket's size. A client may bind each subscription with a token of
   * its own (the IG's flow), all at once on (re)connecting: as many as one token may name.
   */
  readonly messageBurst: number;
  /**
   * The bind window: a connection that holds no binding this long after opening, or after losing
   * its last binding (`unbind`, its subscription deleted, off or moved), is closed (1008). Anyone
   * may open a socket; only a bind is authorised (token or API key), so talking (a bare `unbind`
   * is valid with no binding) does not keep one open. A client binds at once.
   */
  readonly firstMessageWithinMs: number;
}

export const DEFAULT_HUB_LIMITS: HubLimits = {
  // 1 MiB: dozens of notification bundles; a reader further behind than that is not keeping up.
  maxBufferedBytes: 1024 * 1024,
  // 30 s: well inside the 60 s idle timeouts of common proxies and load balancers.
  pingIntervalMs: 30_000,
  maxMessagesPerSecond: 20,
  // 100: the subscriptions one binding token may name (fhir-routes.ts, MAX_BINDING_SUBSCRIPTIONS).
  messageBurst: 100,
  firstMessageWithinMs: 30_000,
};

/**
 * What a socket counts against in the per-address cap on unbound sockets: the TCP peer (behind a
 * reverse proxy, the proxy). An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack
 * listener reports) counts as its IPv4 form, so one IPv4 client is one key on any listener; any
 * other IPv6 address by its /64 (`2001:db8:0:1::/64`), the block one host or site is given, so a
 * client cannot step around the cap by using another of its addresses.
 */
export function remoteAddressOf(req: { readonly socket: { readonly remoteAddress?: string | undefined } }): string {
  const address = req.socket.remoteAddress ?? '';
  if (!address.includes(':')) return address;
  if (address.startsWith('::ffff:') && address.includes('.')) return address.slice('::ffff:'.length);
  return ipv6Prefix64(address);
}

/** The first four groups of an IPv6 address, without leading zeros, as `a:b:c:d::/64`. */
function ipv6Prefix64(address: string): string {
  const bare = address.split('%')[0] as string; // no zone index (`fe80::1%eth0`)
  const groupsOf = (part: string): string[] =>
    part === '' ? [] : part.split(':').flatMap((g) => (g.includes('.') ? ['0', '0'] : [g]));
  const [head = '', tail] = bare.split('::');
  const front = groupsOf(head);
  const back = tail === undefined ? [] : groupsOf(tail);
  const groups = [...front, ...Array<string>(Math.max(8 - front.length - back.length, 0)).fill('0'), ...back];
  return `${groups
    .slice(0, 4)
    .map((g) => (Number.parseInt(g, 16) || 0).toString(16))
    .join(':')}::/64`;
}

/**
 * Open sockets holding no binding, by remote address (`LocalSockets.unboundFrom`). An address
 * leaves the map when its count reaches 0: the map holds no more entries than unbound sockets.
 */
export class UnboundByAddress {
  readonly #counts = new Map<string, number>();

  of(address: string): number {
    return this.#counts.get(address) ?? 0;
  }

  add(address: string): void {
    this.#counts.set(address, this.of(address) + 1);
  }

  remove(address: string): void {
    const left = this.of(address) - 1;
    if (left > 0) this.#counts.set(address, left);
    else this.#counts.delete(address);
  }

  /** Addresses with at least one unbound socket. */
  get addresses(): number {
    return this.#counts.size;
  }
}

interface Socket {
  readonly ws: WebSocket;
  /** The TCP socket under `ws` when the hub upgraded it: pre-built frames are written to it directly. */
  readonly raw: Duplex | undefined;
  readonly conn: Connection;
  /** `remoteAddressOf` its upgrade request: what it counts against while it holds no binding. */
  readonly address: string;
  alive: boolean;
  tokens: number;
  refilledAt: number;
  /** It holds at least one binding (as the channel reports through `markBound`). */
  bound: boolean;
  /** While it holds none: closes it at the end of the bind window. */
  unboundTimer: NodeJS.Timeout | undefined;
}

export interface MessageHandler {
  onMessage(conn: Connection, text: string): Promise<void>;
  onClose(connectionId: string): Promise<void>;
}

/**
 * The broker's own socket layer as `main.ts` and `createBroker` see it: a WebSocketPort that also
 * takes upgraded sockets, reports client messages to one handler and closes everything at shutdown.
 * Implemented in process (LocalWebSocketHub) and over socket-writer processes (SocketProcessHub).
 */
export interface LocalSockets extends WebSocketPort {
  handle(handler: MessageHandler): void;
  /** Take over an HTTP upgrade request for `/ws` that passed the path and auth checks. */
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer, owner: string | undefined): void;
  closeAll(code?: number, reason?: string): void;
  /** Required here: the local layers close a socket that holds no binding for the bind window. */
  markBound(connectionId: string, bound: boolean): void;
  /**
   * Open sockets from `address` (as `remoteAddressOf` gives it) that hold no binding: from the
   * upgrade until `markBound(id, true)`, and again from `markBound(id, false)` until the close.
   */
  unboundFrom(address: string): number;
  readonly size: number;
}

export class LocalWebSocketHub implements LocalSockets {
  readonly #sockets = new Map<string, Socket>();
  readonly #unbound = new UnboundByAddress();
  readonly #limits: HubLimits;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #pinger: NodeJS.Timeout;
  #handler: MessageHandler | undefined;
  #wss: WebSocketServer | undefined;
  #lastText = '';
  #lastData: Buffer = Buffer.alloc(0);
  #lastFrame: Buffer = Buffer.alloc(0);

  constructor(deps: { logger: Logger; metrics: Metrics; limits?: Partial<HubLimits> }) {
    this.#limits = { ...DEFAULT_HUB_LIMITS, ...deps.limits };
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
    this.#pinger = setInterval(() => this.#pingAll(), this.#limits.pingIntervalMs);
    this.#pinger.unref();
    deps.metrics.gauge('broker_websocket_connections', () => this.#sockets.size);
  }

  /**
   * One notification goes to many sockets as the same string: encode it once, not per socket
   * (a 10,000-socket fan-out otherwise spends its time re-encoding).
   */
  #encode(text: string): Buffer {
    if (text !== this.#lastText) {
      this.#lastText = text;
      this.#lastData = Buffer.from(text, 'utf8');
      this.#lastFrame = textFrame(this.#lastData);
    }
    return this.#lastData;
  }

  handle(handler: MessageHandler): void {
    this.#handler = handler;
  }

  get size(): number {
    return this.#sockets.size;
  }

  unboundFrom(address: string): number {
    return this.#unbound.of(address);
  }

  /** Completes the WebSocket handshake on `socket` and accepts it (with `id` when the caller chose one). */
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer, owner: string | undefined, id?: string): void {
    this.#wss ??= new WebSocketServer({
      noServer: true,
      maxPayload: MAX_CLIENT_MESSAGE_BYTES,
      perMessageDeflate: false,
    });
    const address = remoteAddressOf(req);
    // ws completes the handshake synchronously (no verifyClient, no compression): the socket is
    // counted unbound before the caller can check the next upgrade against the cap.
    this.#wss.handleUpgrade(req, socket, head, (ws) => {
      const accepted = this.accept(ws, owner, id, socket, address, dialectOf(req));
      this.#logger.debug('websocket connected', { connection: accepted, owner: owner ?? null });
    });
  }

  accept(
    ws: WebSocket,
    apiOwner?: string,
    id: string = randomUUID(),
    raw?: Duplex,
    address = '',
    dialect?: 'medplum',
  ): string {
    const socket: Socket = {
      ws,
      raw,
      conn: { id, ...(apiOwner === undefined ? {} : { apiOwner }), ...(dialect === undefined ? {} : { dialect }) },
      address,
      alive: true,
      tokens: this.#limits.messageBurst,
      refilledAt: Date.now(),
      bound: false,
      unboundTimer: undefined,
    };
    this.#sockets.set(id, socket);
    this.#unbound.add(address);
    this.#startBindWindow(id, socket);
    ws.on('pong', () => {
      socket.alive = true;
    });
    ws.on('message', (data, isBinary) => this.#guard(id, () => this.#onMessage(socket, data, isBinary)));
    ws.on('close', () => this.#guard(id, () => this.#onClose(id)));
    // A frame past the size limit, or one that breaks the protocol: any client can send one, so
    // counted, and logged only at debug (one line each would let a reconnect loop fill the log).
    ws.on('error', (err) => {
      this.#metrics.inc('broker_websocket_closed_total', { reason: 'protocol-error' });
      this.#logger.debug('websocket error', { connection: id, err });
      ws.terminate();
    });
    return id;
  }

  async send(connectionId: string, text: string): Promise<SendOutcome> {
    return this.sendNow(connectionId, text);
  }

  /** One text to many connections in one synchronous pass (no promise per socket). */
  async sendMany(connectionIds: readonly string[], text: string): Promise<ManyOutcome> {
    return this.sendManyNow(connectionIds, text);
  }

  sendManyNow(connectionIds: readonly string[], text: string): ManyOutcome {
    let sent = 0;
    const gone: string[] = [];
    for (const id of connectionIds) {
      const outcome = this.sendNow(id, text);
      if (outcome === 'sent') sent++;
      else if (outcome === 'gone') gone.push(id);
    }
    return { sent, gone };
  }

  sendNow(connectionId: string, text: string): SendOutcome {
    const socket = this.#sockets.get(connectionId);
    if (socket === undefined || socket.ws.readyState !== socket.ws.OPEN) return 'gone';
    const data = this.#encode(text);
    if (socket.ws.bufferedAmount + data.byteLength > this.#limits.maxBufferedBytes) {
      this.#metrics.inc('broker_websocket_closed_total', { reason: 'slow-consumer' });
      this.#logger.warn('websocket slow consumer closed', {
        connection: connectionId,
        buffered: socket.ws.bufferedAmount,
      });
      socket.ws.close(CLOSE.slowConsumer, 'slow consumer: send buffer full');
      // A client that stopped reading may never finish the closing handshake either.
      setTimeout(() => socket.ws.terminate(), 1000).unref();
      return 'gone';
    }
    if (socket.raw === undefined) socket.ws.send(data, { binary: false });
    // The same server frame (unmasked, uncompressed) for every socket: framed once, written as one
    // buffer. Same write queue as ws's own frames, so order holds; ws never queues (no deflate).
    else socket.raw.write(this.#lastFrame);
    return 'sent';
  }

  /**
   * Resolves at once while the socket's send buffer holds at most half its cap; else once all of
   * it has gone to the kernel (a write of nothing completes after everything written before it),
   * or the socket closed. A reader that stops reading is let go by the ping rule (no pong).
   */
  drained(connectionId: string): Promise<void> {
    const socket = this.#sockets.get(connectionId);
    if (socket === undefined || socket.ws.readyState !== socket.ws.OPEN) return Promise.resolve();
    if (socket.ws.bufferedAmount <= this.#limits.maxBufferedBytes / 2) return Promise.resolve();
    const { ws, raw } = socket;
    return new Promise((resolve) => {
      const done = (): void => {
        ws.off('close', done);
        resolve();
      };
      ws.once('close', done);
      if (raw === undefined) setImmediate(done);
      else raw.write(NOTHING, done);
    });
  }

  /**
   * The channel reports whether the connection holds a binding. Losing the last one starts the
   * bind window again; reporting `false` while already unbound does not (it counts from the open,
   * or from the loss, however much the client talks meanwhile).
   */
  markBound(connectionId: string, bound: boolean): void {
    const socket = this.#sockets.get(connectionId);
    if (socket === undefined || socket.bound === bound) return;
    socket.bound = bound;
    if (bound) {
      clearTimeout(socket.unboundTimer);
      socket.unboundTimer = undefined;
      this.#unbound.remove(socket.address);
    } else {
      this.#unbound.add(socket.address);
      this.#startBindWindow(connectionId, socket);
    }
  }

  #startBindWindow(id: string, socket: Socket): void {
    clearTimeout(socket.unboundTimer);
    const windowMs = this.#limits.firstMessageWithinMs;
    socket.unboundTimer = setTimeout(() => {
      socket.unboundTimer = undefined;
      if (socket.bound || this.#sockets.get(id) !== socket || socket.ws.readyState !== socket.ws.OPEN) return;
      this.#metrics.inc('broker_websocket_closed_total', { reason: 'unbound' });
      this.#logger.debug('websocket closed: nothing bound', { connection: id });
      socket.ws.close(CLOSE.policy, `no subscription bound within ${duration(windowMs)}`);
      // A client squatting on the socket need not finish the closing handshake either.
      setTimeout(() => socket.ws.terminate(), 1000).unref();
    }, windowMs);
    socket.unboundTimer.unref();
  }

  async close(connectionId: string, code: number, reason: string): Promise<void> {
    const socket = this.#sockets.get(connectionId);
    if (socket === undefined) return;
    socket.ws.close(code, reason);
    setTimeout(() => socket.ws.terminate(), 1000).unref();
  }

  async isOpen(connectionId: string): Promise<boolean> {
    return this.isOpenNow(connectionId);
  }

  isOpenNow(connectionId: string): boolean {
    const socket = this.#sockets.get(connectionId);
    return socket !== undefined && socket.ws.readyState === socket.ws.OPEN;
  }

  /** Close every socket (shutdown). */
  closeAll(code: number = CLOSE.goingAway, reason = 'broker shutting down'): void {
    clearInterval(this.#pinger);
    for (const s of this.#sockets.values()) {
      clearTimeout(s.unboundTimer);
      s.ws.close(code, reason);
    }
  }

  async #onMessage(socket: Socket, data: unknown, isBinary: boolean): Promise<void> {
    if (isBinary) {
      this.#metrics.inc('broker_websocket_closed_total', { reason: 'binary' });
      socket.ws.close(CLOSE.unsupportedData, 'binary frames are not supported');
      return;
    }
    const now = Date.now();
    const rate = this.#limits.maxMessagesPerSecond;
    socket.tokens = Math.min(this.#limits.messageBurst, socket.tokens + ((now - socket.refilledAt) / 1000) * rate);
    socket.refilledAt = now;
    if (socket.tokens < 1) {
      this.#metrics.inc('broker_websocket_closed_total', { reason: 'flood' });
      socket.ws.close(CLOSE.flood, 'too many messages');
      return;
    }
    socket.tokens -= 1;
    const text = Buffer.isBuffer(data)
      ? data.toString('utf8')
      : Array.isArray(data)
        ? Buffer.concat(data).toString('utf8')
        : String(data);
    await this.#handler?.onMessage(socket.conn, text);
  }

  async #onClose(id: string): Promise<void> {
    this.#remove(id);
    await this.#handler?.onClose(id);
  }

  /**
   * Every way out of the hub ends here (a close of any cause; a socket dropped for a missing pong,
   * whose close event comes later): a socket leaves the unbound count once, whatever comes after.
   */
  #remove(id: string): void {
    const socket = this.#sockets.get(id);
    if (socket === undefined) return;
    clearTimeout(socket.unboundTimer);
    this.#sockets.delete(id);
    if (!socket.bound) this.#unbound.remove(socket.address);
  }

  #pingAll(): void {
    for (const [id, s] of this.#sockets) {
      if (!s.alive) {
        this.#metrics.inc('broker_websocket_closed_total', { reason: 'no-pong' });
        s.ws.terminate();
        this.#remove(id);
        this.#guard(id, () => this.#handler?.onClose(id) ?? Promise.resolve());
        continue;
      }
      s.alive = false;
      try {
        s.ws.ping();
      } catch {
        s.ws.terminate();
      }
    }
  }

  /** One socket's failure is logged and closes that socket only. */
  #guard(id: string, fn: () => Promise<void>): void {
    fn().catch((err: unknown) => {
      this.#logger.error('websocket handler failed', { connection: id, err: err as Error });
      this.#sockets.get(id)?.ws.terminate();
    });
  }
}

const NOTHING = Buffer.alloc(0);

/** `30 s`, or `250 ms` below a second (tests). */
function duration(ms: number): string {
  return ms >= 1000 && ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

/** A final, unmasked RFC 6455 text frame (what `ws` sends for a server text message without compression). */
function textFrame(payload: Buffer): Buffer {
  const n = payload.byteLength;
  const headerLength = n < 126 ? 2 : n < 65_536 ? 4 : 10;
  const frame = Buffer.allocUnsafe(headerLength + n);
  frame[0] = 0x81; // FIN + opcode 1 (text)
  if (n < 126) frame[1] = n;
  else if (n < 65_536) {
    frame[1] = 126;
    frame.writeUInt16BE(n, 2);
  } else {
    frame[1] = 127;
    frame.writeUInt32BE(Math.floor(n / 2 ** 32), 2);
    frame.writeUInt32BE(n >>> 0, 6);
  }
  payload.copy(frame, headerLength);
  return frame;
}
