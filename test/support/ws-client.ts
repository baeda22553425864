import WebSocket from 'ws';
import { Waiters } from './waiters.js';

/** A real `ws` client that records every frame and can wait for one (woken per frame, no polling). */
export class WsClient {
  readonly messages: string[] = [];
  closed: { code: number; reason: string } | undefined;
  readonly #waiters = new Waiters();

  private constructor(readonly socket: WebSocket) {
    socket.on('message', (data) => {
      this.messages.push(String(data));
      this.#wake();
    });
    socket.on('close', (code, reason) => {
      this.closed = { code, reason: String(reason) };
      this.#wake();
    });
    socket.on('error', () => this.#wake());
  }

  static async connect(url: string, headers: Record<string, string> = {}): Promise<WsClient> {
    const socket = new WebSocket(url, { headers });
    const client = new WsClient(socket);
    await new Promise<void>((resolve, reject) => {
      socket.once('open', () => resolve());
      socket.once('error', reject);
      socket.once('unexpected-response', (_req, res) => reject(new Error(`upgrade refused: ${res.statusCode}`)));
    });
    return client;
  }

  send(text: string): void {
    this.socket.send(text);
  }

  /** JSON frames parsed; text frames (R4 `bound`/`ping`) left out. */
  /** The FHIR Bundles received (not the JSON protocol messages such as `unbound`). */
  get bundles(): Record<string, unknown>[] {
    return this.messages
      .filter((m) => m.startsWith('{'))
      .map((m) => JSON.parse(m) as Record<string, unknown>)
      .filter((m) => m.resourceType === 'Bundle');
  }

  async waitFor(predicate: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
    await this.#waiters
      .until(() => (predicate() ? true : undefined), what, timeoutMs)
      .catch((err: Error) => {
        throw new Error(
          `${err.message}; got ${JSON.stringify(this.messages.slice(-3))} closed=${JSON.stringify(this.closed)}`,
        );
      });
  }

  waitForClose(timeoutMs = 10_000): Promise<{ code: number; reason: string }> {
    return this.waitFor(() => this.closed !== undefined, 'close', timeoutMs).then(
      () => this.closed as { code: number; reason: string },
    );
  }

  close(): void {
    this.socket.terminate();
  }

  #wake(): void {
    this.#waiters.wake();
  }
}
