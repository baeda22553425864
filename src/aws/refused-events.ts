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
 * `responsePayload` says why.
 */

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
  readonly requestPayload: unknown;
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
    const record: RefusedEventRecord = {
      version: '1.0',
      timestamp: now.toISOString(),
      requestContext: {
        condition: 'Refused',
        ...(invocation.awsRequestId === undefined ? {} : { requestId: invocation.awsRequestId }),
        ...(invocation.invokedFunctionArn === undefined ? {} : { functionArn: invocation.invokedFunctionArn }),
      },
      requestPayload: event,
      responsePayload: { errorType: refusal.code, errorMessage: refusal.message },
    };
    const sent = await this.#client.send(
      new SendMessageCommand({ QueueUrl: this.#queueUrl, MessageBody: JSON.stringify(record) }),
    );
    return sent.MessageId ?? '';
  }
}
