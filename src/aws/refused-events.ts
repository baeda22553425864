import { SendMessageCommand, type SQSClient } from '@aws-sdk/client-sqs';
import type { Context } from 'aws-lambda';
import { BrokerError } from '../core/errors.js';

/**
 * Where the Lambda events function puts an event the broker refuses (not an EventBridge event,
 * more events than one call may carry): on the dead-letter queue at once, and the invocation
 * succeeds. Failing it instead would make Lambda run it twice more, to the same refusal (each run
 * logging and counting it again), before its own failure record reached the same queue.
 *
 * The message has the shape of Lambda's failure records (`requestPayload` is the event, as
 * received), so one replay procedure reads both; `requestContext.condition` is `Refused` and
 * `responsePayload` says why. A record that would not fit in an SQS message (MAX_MESSAGE_BYTES)
 * leaves the event out and says what it was (`requestPayloadOmitted`): the refusal still reaches
 * the queue and its alarm, where the whole event, and Lambda's own failure record, would not.
 */

/**
 * 256 KiB: SQS's message size limit before 2025, and still the `MaximumMessageSize` of a queue
 * created then (the dead-letter queue is retained across deployments).
 */
export const MAX_MESSAGE_BYTES = 256 * 1024;
/** Event ids named in a record whose event was left out. */
const OMITTED_IDS = 100;

/** What of the Lambda context the record names: which invocation refused the event. */
export type RefusingInvocation = Partial<Pick<Context, 'awsRequestId' | 'invokedFunctionArn'>>;

export interface RefusedEventRecord {
  readonly version: '1.0';
  /** When the broker refused it (ISO 8601). */
  readonly timestamp: string;
  readonly requestContext: {
    readonly condition: 'Refused';
    readonly requestId?: string;
    readonly functionArn?: string;
  };
  /** The invocation's event, unchanged: what to replay once whatever made it unreadable is fixed. */
  readonly requestPayload?: unknown;
  /** Instead of `requestPayload` when the record would be too large: its size, events and their ids. */
  readonly requestPayloadOmitted?: { readonly bytes: number; readonly events: number; readonly ids: readonly string[] };
  /** `errorType` is the broker's error code (docs/errors.md). */
  readonly responsePayload: { readonly errorType: string; readonly errorMessage: string };
}

/** Whether `err` is the broker refusing what it was given (retrying cannot change the answer). */
export function isRefusal(err: unknown): err is BrokerError {
  return err instanceof BrokerError && (err.code === 'INVALID_EVENT' || err.code === 'TOO_MANY_EVENTS');
}

export class RefusedEventQueue {
  readonly #client: SQSClient;
  readonly #queueUrl: string;

  constructor(client: SQSClient, queueUrl: string) {
    this.#client = client;
    this.#queueUrl = queueUrl;
  }

  /** Sends the record; resolves with the message id once SQS has it, rejects when it does not. */
  async put(event: unknown, refusal: BrokerError, invocation: RefusingInvocation, now: Date): Promise<string> {
    const record = (payload: Pick<RefusedEventRecord, 'requestPayload' | 'requestPayloadOmitted'>): string =>
      messageBody({
        version: '1.0',
        timestamp: now.toISOString(),
        requestContext: {
          condition: 'Refused',
          ...(invocation.awsRequestId === undefined ? {} : { requestId: invocation.awsRequestId }),
          ...(invocation.invokedFunctionArn === undefined ? {} : { functionArn: invocation.invokedFunctionArn }),
        },
        ...payload,
        responsePayload: { errorType: refusal.code, errorMessage: refusal.message },
      });
    let body = record({ requestPayload: event });
    if (Buffer.byteLength(body) > MAX_MESSAGE_BYTES) {
      const events = Array.isArray(event) ? event : [event];
      const ids = events
        .slice(0, OMITTED_IDS)
        .map((e) => (e as { id?: unknown } | null)?.id)
        .filter((id): id is string => typeof id === 'string')
        .map((id) => id.slice(0, 256));
      body = record({ requestPayloadOmitted: { bytes: Buffer.byteLength(body), events: events.length, ids } });
    }
    const sent = await this.#client.send(new SendMessageCommand({ QueueUrl: this.#queueUrl, MessageBody: body }));
    return sent.MessageId ?? '';
  }
}

/**
 * The record as JSON that SQS takes: JSON.stringify escapes control characters and lone
 * surrogates, but not U+FFFE and U+FFFF, which SQS refuses in a message body.
 */
function messageBody(record: RefusedEventRecord): string {
  return JSON.stringify(record).replace(/[\ufffe\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16)}`);
}
