import { createHash, randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Waiters } from './waiters.js';

/**
 * Local HTTP doubles for the AWS endpoints that cannot run here: the API Gateway management
 * API (`/@connections/{id}`), EventBridge `PutEvents`, Secrets Manager `GetSecretValue` and SQS
 * `ReceiveMessage` / `DeleteMessageBatch`. They record every request exactly as the
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
  readonly #waiters = new Waiters();

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
        void Promise.resolve(this.answer(recorded)).then(({ status, headers, body }) => {
          const write = (): void => {
            res.writeHead(status, headers).end(body);
            this.answered.push(recorded);
            this.#waiters.wake();
          };
          if (this.answerDelayMs > 0) setTimeout(write, this.answerDelayMs);
          else write();
        });
      });
    });
  }

  /** Resolves once `done` holds, checked as each answer goes out. */
  waitFor(done: () => boolean, what: string, timeoutMs = 10_000): Promise<true> {
    return this.#waiters.until(() => (done() ? true : undefined), what, timeoutMs);
  }

  /** May wait (a long poll) before it answers. */
  protected abstract answer(req: RecordedRequest): Answer | Promise<Answer>;

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

interface QueuedMessage {
  readonly MessageId: string;
  /** A new one on every receive, as SQS gives: a delete with an older one deletes nothing. */
  ReceiptHandle: string;
  readonly Body: string;
  receives: number;
}

/**
 * SQS (AWS JSON 1.0, as `@aws-sdk/client-sqs` speaks it) for the broker's calls: ReceiveMessage
 * (a long poll: it answers once a message is sent or the wait asked for is over),
 * DeleteMessageBatch and ChangeMessageVisibilityBatch (recorded, always successful). A message handed out stays in flight until deleted; it is handed out again
 * (as SQS does once its visibility timeout is over) when a test calls `redeliverUndeleted`.
 */
export class SqsDouble extends HttpDouble {
  /** Message ids deleted, in order. */
  readonly deleted: string[] = [];
  /** How many times each message id was handed out. */
  readonly receives = new Map<string, number>();
  /** Message ids whose next delete is reported failed (once each). */
  readonly failDeletes = new Set<string>();
  /** While set, every SendMessage is answered QueueDoesNotExist (not retried by the SDK). */
  failSends = false;
  /** A queue's MaximumMessageSize: a larger SendMessage body is refused, as SQS refuses it. */
  maxMessageBytes = 256 * 1024;
  #waiting: QueuedMessage[] = [];
  readonly #inFlight = new Map<string, QueuedMessage>();
  /** Long polls waiting for a message. */
  readonly #polls = new Set<() => void>();

  static async start(): Promise<SqsDouble> {
    const d = new SqsDouble();
    await d.listen();
    return d;
  }

  /** Each request's `X-Amz-Target` and JSON body, with its Authorization header. */
  get calls(): { target: string; body: Record<string, unknown>; authorization: string | undefined }[] {
    return this.requests.map((r) => ({
      target: String(r.headers['x-amz-target'] ?? ''),
      body: JSON.parse(r.body || '{}') as Record<string, unknown>,
      authorization: r.headers.authorization,
    }));
  }

  /** Queues the bodies as messages; their message ids. */
  send(...bodies: string[]): string[] {
    const added = bodies.map((Body) => ({ MessageId: randomUUID(), ReceiptHandle: randomUUID(), Body, receives: 0 }));
    this.#waiting.push(...added);
    this.#wakePolls();
    return added.map((m) => m.MessageId);
  }

  redeliverUndeleted(): void {
    this.#waiting.push(...this.#inFlight.values());
    this.#inFlight.clear();
    this.#wakePolls();
  }

  /** Messages not deleted: in flight, then waiting. */
  get undeleted(): QueuedMessage[] {
    return [...this.#inFlight.values(), ...this.#waiting];
  }

  #wakePolls(): void {
    for (const wake of [...this.#polls]) wake();
  }

  override async close(): Promise<void> {
    this.#wakePolls();
    await super.close();
  }

  protected async answer(req: RecordedRequest): Promise<Answer> {
    const target = String(req.headers['x-amz-target'] ?? '');
    const body = JSON.parse(req.body || '{}') as Record<string, unknown>;
    const json = (status: number, out: unknown): Answer => ({
      status,
      headers: { 'content-type': 'application/x-amz-json-1.0' },
      body: JSON.stringify(out),
    });
    if (target === 'AmazonSQS.ReceiveMessage') {
      if (this.#waiting.length === 0) {
        await new Promise<void>((resolve) => {
          const wake = (): void => {
            clearTimeout(timer);
            this.#polls.delete(wake);
            resolve();
          };
          const timer = setTimeout(wake, Number(body.WaitTimeSeconds ?? 0) * 1000);
          this.#polls.add(wake);
        });
      }
      const out = this.#waiting.splice(0, Number(body.MaxNumberOfMessages ?? 1));
      for (const m of out) {
        m.receives++;
        this.receives.set(m.MessageId, m.receives);
        m.ReceiptHandle = randomUUID();
        this.#inFlight.set(m.ReceiptHandle, m);
      }
      const Messages = out.map((m) => ({
        MessageId: m.MessageId,
        ReceiptHandle: m.ReceiptHandle,
        Body: m.Body,
        // As SQS sends it: the SDK checks it and refuses a receive whose body does not match.
        MD5OfBody: createHash('md5').update(m.Body).digest('hex'),
        Attributes: { ApproximateReceiveCount: String(m.receives) },
      }));
      return json(200, Messages.length === 0 ? {} : { Messages });
    }
    if (target === 'AmazonSQS.DeleteMessageBatch') {
      const Successful: { Id: string }[] = [];
      const Failed: { Id: string; Code: string; SenderFault: boolean; Message: string }[] = [];
      for (const e of body.Entries as { Id: string; ReceiptHandle: string }[]) {
        const m = this.#inFlight.get(e.ReceiptHandle);
        if (m === undefined) {
          // Not the handle of the message's latest receive.
          Failed.push({ Id: e.Id, Code: 'ReceiptHandleIsInvalid', SenderFault: true, Message: 'stale handle' });
          continue;
        }
        if (this.failDeletes.delete(m.MessageId)) {
          Failed.push({ Id: e.Id, Code: 'InternalError', SenderFault: false, Message: 'try again' });
          continue;
        }
        this.#inFlight.delete(e.ReceiptHandle);
        this.deleted.push(m.MessageId);
        Successful.push({ Id: e.Id });
      }
      return json(200, { Successful, ...(Failed.length === 0 ? {} : { Failed }) });
    }
    if (target === 'AmazonSQS.SendMessage') {
      if (this.failSends) {
        return json(400, {
          __type: 'com.amazonaws.sqs#QueueDoesNotExist',
          message: 'The specified queue does not exist.',
        });
      }
      const messageBody = String(body.MessageBody);
      // SQS's rules: the size, and only these characters (#x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD #x10000-).
      if (
        Buffer.byteLength(messageBody) > this.maxMessageBytes ||
        /[^\t\n\r\x20-\ud7ff\ue000-\ufffd\u{10000}-\u{10ffff}]/u.test(messageBody)
      ) {
        return json(400, { __type: 'com.amazonaws.sqs#InvalidParameterValue', message: 'invalid message body' });
      }
      const [MessageId] = this.send(messageBody);
      // As SQS answers: the SDK checks the digest against what it sent.
      return json(200, { MessageId, MD5OfMessageBody: createHash('md5').update(messageBody).digest('hex') });
    }
    if (target === 'AmazonSQS.ChangeMessageVisibilityBatch') {
      const entries = body.Entries as { Id: string; ReceiptHandle: string }[];
      return json(200, { Successful: entries.map((e) => ({ Id: e.Id })) });
    }
    return json(400, { __type: 'com.amazonaws.sqs#InvalidAction', message: `unknown target ${target}` });
  }
}
