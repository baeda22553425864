import { createHash, randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { createServer, type IncomingMessage, request, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * The AWS front door of one Lambda function in tests: every AWS SDK client of the function is
 * pointed here (`AWS_ENDPOINT_URL`, and the WebSocket management endpoint), and every request is
 * recorded (service, operation, JSON input) before it is passed on: DynamoDB to DynamoDB Local,
 * PutEvents to an EventBridge double, `@connections` calls to a management API double. Secrets
 * Manager's GetSecretValue and SQS's SendMessage (kept in `sqsMessages`) are answered here. A request for anything else is recorded as
 * `unknown` and refused, so a new kind of AWS call cannot go unnoticed.
 */

export type AwsService = 'dynamodb' | 'secretsmanager' | 'events' | 'execute-api' | 'sqs' | 'unknown';

export interface AwsCall {
  readonly service: AwsService;
  /** The API operation (`Query`, `GetSecretValue`, `PutEvents`), or the HTTP method of an `@connections` call. */
  readonly operation: string;
  /** The request's JSON body; for `@connections` calls, the stage and connection id. */
  readonly input: Readonly<Record<string, unknown>>;
}

export interface RecorderTargets {
  /** DynamoDB Local. */
  readonly dynamodb: string;
  /** ManagementApiDouble: answers `/@connections/{id}`. */
  readonly management: string;
  /** EventBridgeDouble. */
  readonly eventBridge: string;
  /** SecretId → SecretString, for GetSecretValue. */
  readonly secrets: Readonly<Record<string, string>>;
}

const CONNECTIONS_PATH = /^\/([^/]+)\/@connections\/([^/?]+)$/;

export class AwsRecorder {
  readonly calls: AwsCall[] = [];
  /** SendMessage requests answered, as sent (QueueUrl, MessageBody). */
  readonly sqsMessages: { QueueUrl: string; MessageBody: string }[] = [];
  readonly #targets: RecorderTargets;
  readonly #server: Server;

  private constructor(targets: RecorderTargets) {
    this.#targets = targets;
    this.#server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        this.#route(req, Buffer.concat(chunks), res).catch((err: unknown) => {
          res.writeHead(500, { 'content-type': 'text/plain' }).end(String(err));
        });
      });
    });
  }

  static async start(targets: RecorderTargets): Promise<AwsRecorder> {
    const recorder = new AwsRecorder(targets);
    recorder.#server.listen(0, '127.0.0.1');
    await once(recorder.#server, 'listening');
    return recorder;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.#server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    this.#server.closeAllConnections();
    this.#server.close();
    await once(this.#server, 'close').catch(() => undefined);
  }

  async #route(req: IncomingMessage, body: Buffer, res: ServerResponse): Promise<void> {
    const target = String(req.headers['x-amz-target'] ?? '');
    const [prefix = '', operation = ''] = target.split('.');
    const json = (): Record<string, unknown> => JSON.parse(body.toString('utf8') || '{}') as Record<string, unknown>;
    if (prefix === 'DynamoDB_20120810') {
      this.calls.push({ service: 'dynamodb', operation, input: json() });
      return forward(this.#targets.dynamodb, req.url ?? '/', req, body, res);
    }
    if (target === 'AWSEvents.PutEvents') {
      this.calls.push({ service: 'events', operation, input: json() });
      return forward(this.#targets.eventBridge, req.url ?? '/', req, body, res);
    }
    if (target === 'secretsmanager.GetSecretValue') {
      const input = json();
      this.calls.push({ service: 'secretsmanager', operation, input });
      return this.#answerSecret(String(input.SecretId), res);
    }
    if (target === 'AmazonSQS.SendMessage') {
      const input = json();
      this.calls.push({ service: 'sqs', operation, input });
      const message = { QueueUrl: String(input.QueueUrl), MessageBody: String(input.MessageBody) };
      this.sqsMessages.push(message);
      const md5 = createHash('md5').update(message.MessageBody).digest('hex');
      res
        .writeHead(200, { 'content-type': 'application/x-amz-json-1.0' })
        .end(JSON.stringify({ MessageId: randomUUID(), MD5OfMessageBody: md5 }));
      return;
    }
    const connection = CONNECTIONS_PATH.exec(req.url ?? '');
    if (connection !== null) {
      const [, stage = '', id = ''] = connection;
      this.calls.push({ service: 'execute-api', operation: req.method ?? '', input: { stage, connectionId: id } });
      return forward(this.#targets.management, `/@connections/${id}`, req, body, res);
    }
    this.calls.push({ service: 'unknown', operation: `${req.method} ${req.url} ${target}`, input: {} });
    res.writeHead(400, { 'content-type': 'text/plain' }).end('not an AWS call this recorder knows');
  }

  #answerSecret(secretId: string, res: ServerResponse): void {
    const value = this.#targets.secrets[secretId];
    const headers = { 'content-type': 'application/x-amz-json-1.1' };
    if (value === undefined) {
      res
        .writeHead(400, { ...headers, 'x-amzn-errortype': 'ResourceNotFoundException' })
        .end(JSON.stringify({ __type: 'ResourceNotFoundException', message: `no secret ${secretId}` }));
      return;
    }
    res.writeHead(200, headers).end(JSON.stringify({ ARN: secretId, Name: secretId, SecretString: value }));
  }
}

/** Passes one request on to `origin` and its answer back, as they are (SigV4 headers included). */
async function forward(
  origin: string,
  path: string,
  req: IncomingMessage,
  body: Buffer,
  res: ServerResponse,
): Promise<void> {
  const upstream = request(`${origin}${path}`, {
    method: req.method,
    headers: { ...req.headers, host: new URL(origin).host },
  });
  upstream.end(body);
  const [answer] = (await once(upstream, 'response')) as [IncomingMessage];
  res.writeHead(answer.statusCode ?? 502, answer.headers);
  answer.pipe(res);
}
