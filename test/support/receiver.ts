import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { Waiters } from './waiters.js';

/**
 * A real HTTP webhook receiver on 127.0.0.1:0. It records every request and answers with what
 * `respond` says (204 by default). `waitFor` resolves when a predicate over the recorded requests
 * holds, woken by each arrival (no polling).
 */

export interface ReceivedRequest {
  readonly path: string;
  readonly method: string;
  readonly headers: IncomingHttpHeaders;
  readonly body: string;
  readonly at: number;
  /** Which TCP connection carried it: 1 for the first the receiver accepted, 2 for the next…. */
  readonly connection: number;
}

export type Responder = (req: ReceivedRequest) => {
  status: number;
  headers?: Record<string, string>;
  delayMs?: number;
  /** Answer once this settles (after `delayMs`, if both): a request held for exactly as long as a test needs. */
  until?: Promise<unknown>;
};

export class Receiver {
  readonly requests: ReceivedRequest[] = [];
  /** Every request as it arrives, before it is answered (`requests` and `failures` fill as answers go out). */
  readonly arrived: ReceivedRequest[] = [];
  respond: Responder = () => ({ status: 204 });
  /** Requests arrived and not yet answered, now and at the most: exact, no timing involved. */
  open = 0;
  peakOpen = 0;
  readonly #server: Server;
  readonly #waiters = new Waiters();
  readonly #connections = new WeakMap<Socket, number>();
  #connectionCount = 0;

  private constructor() {
    this.#server = createServer((req, res) => {
      let connection = this.#connections.get(req.socket);
      if (connection === undefined) {
        connection = ++this.#connectionCount;
        this.#connections.set(req.socket, connection);
      }
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const received: ReceivedRequest = {
          path: req.url ?? '',
          method: req.method ?? '',
          headers: req.headers,
          body: Buffer.concat(chunks).toString('utf8'),
          at: Date.now(),
          connection,
        };
        this.open++;
        this.peakOpen = Math.max(this.peakOpen, this.open);
        this.arrived.push(received);
        this.#waiters.wake();
        const answer = this.respond(received);
        const reply = (): void => {
          if (answer.status >= 200 && answer.status < 300) {
            this.requests.push(received);
          } else {
            this.failures.push(received);
          }
          this.open--;
          res.writeHead(answer.status, answer.headers).end();
          this.#waiters.wake();
        };
        const held = (): void => {
          if (answer.until === undefined) reply();
          else void answer.until.then(reply, reply);
        };
        if (answer.delayMs === undefined) held();
        else setTimeout(held, answer.delayMs);
      });
    });
  }

  /** Requests answered with a non-2xx status. */
  readonly failures: ReceivedRequest[] = [];

  static async start(): Promise<Receiver> {
    const r = new Receiver();
    r.#server.listen(0, '127.0.0.1');
    await once(r.#server, 'listening');
    return r;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  /**
   * The first request `match` accepts gets `answer`; every other one what `respond` answered
   * before. `given` says whether it went out yet.
   */
  answerOnce(match: (req: ReceivedRequest) => boolean, answer: ReturnType<Responder>): { readonly given: boolean } {
    const before = this.respond;
    const state = { given: false };
    this.respond = (req) => {
      if (state.given || !match(req)) return before(req);
      state.given = true;
      return answer;
    };
    return state;
  }

  on(path: string): ReceivedRequest[] {
    return this.requests.filter((r) => r.path === path);
  }

  async waitFor(predicate: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
    await this.#waiters.until(() => (predicate() ? true : undefined), what, timeoutMs);
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    this.#server.close();
    await once(this.#server, 'close').catch(() => undefined);
  }
}
