import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * Local HTTP doubles for the AWS endpoints that cannot run here: the API Gateway management
 * API (`/@connections/{id}`), EventBridge `PutEvents` and Secrets Manager `GetSecretValue`. They record every request exactly as the
 * AWS SDK sent it (SigV4 headers included) so tests assert what would reach AWS.
 */

export interface RecordedRequest {
  readonly method: string;
  readonly path: string;
  readonly headers: IncomingHttpHeaders;
  readonly body: string;
}

interface Answer {
  readonly status: number;
  readonly headers?: Record<string, string>;
  readonly body?: string;
}

abstract class HttpDouble {
  readonly requests: RecordedRequest[] = [];
  /** Requests whose answer has been written, in order (after `answerDelayMs`). */
  readonly answered: RecordedRequest[] = [];
  /** How long each answer waits: an AWS endpoint is slower than a loopback socket. */
  answerDelayMs = 0;
  readonly #server: Server;

  protected constructor() {
    this.#server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        const recorded = {
          method: req.method ?? '',
          path: req.url ?? '',
          headers: req.headers,
          body: Buffer.concat(chunks).toString('utf8'),
        };
        this.requests.push(recorded);
        const { status, headers, body } = this.answer(recorded);
        const write = (): void => {
          res.writeHead(status, headers).end(body);
          this.answered.push(recorded);
        };
        if (this.answerDelayMs > 0) setTimeout(write, this.answerDelayMs);
        else write();
      });
    });
  }

  protected abstract answer(req: RecordedRequest): Answer;

  protected async listen(): Promise<void> {
    this.#server.listen(0, '127.0.0.1');
    await once(this.#server, 'listening');
  }

  get url(): string {
    return `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    this.#server.close();
  }
}

/** API Gateway management API: connections in `live` exist; any other id is gone (410 GoneException). */
export class ManagementApiDouble extends HttpDouble {
  readonly live = new Set<string>();
  /** Live connections whose posts are refused with 403 AccessDeniedException (a role without the grant). */
  readonly denied = new Set<string>();

  static async start(): Promise<ManagementApiDouble> {
    const d = new ManagementApiDouble();
    await d.listen();
    return d;
  }

  /** Messages posted to a connection, decoded. */
  posted(connectionId: string): string[] {
    return this.requests
      .filter((r) => r.method === 'POST' && r.path === `/@connections/${connectionId}`)
      .map((r) => r.body);
  }

  protected answer(req: RecordedRequest): Answer {
    const id = decodeURIComponent(req.path.replace(/^\/@connections\//, ''));
    if (!this.live.has(id)) {
      return {
        status: 410,
        headers: { 'content-type': 'application/json', 'x-amzn-errortype': 'GoneException' },
        body: JSON.stringify({ message: `connection ${id} is gone` }),
      };
    }
    if (req.method === 'POST' && this.denied.has(id)) {
      return {
        status: 403,
        headers: { 'content-type': 'application/json', 'x-amzn-errortype': 'AccessDeniedException' },
        body: JSON.stringify({ message: 'User is not authorized to perform: execute-api:ManageConnections' }),
      };
    }
    if (req.method === 'DELETE') this.live.delete(id);
    if (req.method === 'GET') {
      return {
        status: 200,
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ connectedAt: '2026-11-26T00:00:00Z' }),
      };
    }
    return { status: req.method === 'DELETE' ? 204 : 200 };
  }
}

/** EventBridge PutEvents (AWS JSON 1.1). `failNext` rejects that many of the next entries once each. */
export class EventBridgeDouble extends HttpDouble {
  failNext = 0;

  static async start(): Promise<EventBridgeDouble> {
    const d = new EventBridgeDouble();
    await d.listen();
    return d;
  }

  /** Every entry of every PutEvents request, in order. */
  get entries(): { Source: string; DetailType: string; Detail: string; EventBusName: string }[][] {
    return this.requests.map((r) => (JSON.parse(r.body) as { Entries: never[] }).Entries);
  }

  protected answer(req: RecordedRequest): Answer {
    const entries = (JSON.parse(req.body) as { Entries: unknown[] }).Entries;
    const results = entries.map((_, i) => {
      if (this.failNext > 0) {
        this.failNext--;
        return { ErrorCode: 'InternalFailure', ErrorMessage: 'try again' };
      }
      return { EventId: `${this.requests.length}-${i}` };
    });
    const failed = results.filter((r) => 'ErrorCode' in r).length;
    return {
      status: 200,
      headers: { 'content-type': 'application/x-amz-json-1.1' },
      body: JSON.stringify({ FailedEntryCount: failed, Entries: results }),
    };
  }
}

/** Secrets Manager GetSecretValue (AWS JSON 1.1): answers `secret` as the SecretString, or refuses (403-like AccessDenied) while `failing`. */
export class SecretsManagerDouble extends HttpDouble {
  secret: Record<string, string> = {};
  failing = false;

  static async start(): Promise<SecretsManagerDouble> {
    const d = new SecretsManagerDouble();
    await d.listen();
    return d;
  }

  /** The SecretId of every GetSecretValue request, in order. */
  get reads(): string[] {
    return this.requests
      .filter((r) => r.headers['x-amz-target'] === 'secretsmanager.GetSecretValue')
      .map((r) => (JSON.parse(r.body) as { SecretId: string }).SecretId);
  }

  protected answer(req: RecordedRequest): Answer {
    const { SecretId } = JSON.parse(req.body) as { SecretId: string };
    if (this.failing) {
      return {
        status: 400,
        headers: { 'content-type': 'application/x-amz-json-1.1', 'x-amzn-errortype': 'AccessDeniedException' },
        body: JSON.stringify({ __type: 'AccessDeniedException', message: 'not authorized to GetSecretValue' }),
      };
    }
    return {
      status: 200,
      headers: { 'content-type': 'application/x-amz-json-1.1' },
      body: JSON.stringify({ ARN: SecretId, Name: 'broker', SecretString: JSON.stringify(this.secret) }),
    };
  }
}
