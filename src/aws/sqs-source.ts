import { setTimeout as sleep } from 'node:timers/promises';
import { DeleteMessageBatchCommand, type Message, ReceiveMessageCommand, type SQSClient } from '@aws-sdk/client-sqs';
import { BrokerError } from '../core/errors.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { IngestResult } from '../service/ingest.js';

/**
 * Events pulled from an Amazon SQS queue (an EventBridge rule's target) instead of pushed to
 * `POST /events`: for a broker behind a firewall, which reaches out to SQS and exposes nothing.
 *
 * Long polls of up to 10 messages; each message body is one EventBridge event, taken through the
 * same ingest as `POST /events` (validated, matched, committed with its notifications). A message
 * is deleted only once its event is committed (or was a duplicate or ignored), so a crash, a store
 * failure or a shutdown before that leaves it in the queue: SQS hands it out again after its
 * visibility timeout, and the EventBridge `id` deduplicates a copy that was committed before the
 * delete. A message that is not an event (not JSON, or not an EventBridge event) is logged and left
 * in the queue too: the queue's redrive policy moves it to its dead-letter queue after
 * `maxReceiveCount` receives, where it can be looked at (README, "Pulling events from SQS").
 */

/** 20 s: SQS's longest long poll (fewest empty receives). */
const WAIT_TIME_SECONDS = 20;
/** SQS's most per receive and per delete batch. */
const MAX_MESSAGES = 10;
/** After a failed receive: 1 s, doubling, at most 30 s, until one succeeds. */
const RECEIVE_BACKOFF_MS = 1_000;
const MAX_RECEIVE_BACKOFF_MS = 30_000;

export interface SqsSourceOptions {
  readonly client: Pick<SQSClient, 'send'>;
  readonly queueUrl: string;
  readonly ingest: (body: unknown) => Promise<IngestResult>;
  readonly logger: Logger;
  readonly metrics: Metrics;
  /** Long poll length (tests shorten it); SQS allows 0–20. */
  readonly waitTimeSeconds?: number;
}

export class SqsEventSource {
  readonly #opts: SqsSourceOptions;
  readonly #stop = new AbortController();
  #loop: Promise<void> | undefined;

  constructor(opts: SqsSourceOptions) {
    this.#opts = opts;
  }

  /** Starts polling (once). */
  start(): void {
    this.#loop ??= this.#run();
  }

  /**
   * Stops polling: a long poll under way is cut (SQS keeps what it had not handed out), and the
   * messages already received are taken to the end, ingested and deleted, before this resolves.
   */
  async close(): Promise<void> {
    this.#stop.abort();
    await this.#loop;
  }

  async #run(): Promise<void> {
    const { client, queueUrl, logger } = this.#opts;
    const signal = this.#stop.signal;
    logger.info('sqs source started', { queueUrl });
    let failures = 0;
    while (!signal.aborted) {
      let messages: Message[];
      try {
        const out = await client.send(
          new ReceiveMessageCommand({
            QueueUrl: queueUrl,
            MaxNumberOfMessages: MAX_MESSAGES,
            WaitTimeSeconds: this.#opts.waitTimeSeconds ?? WAIT_TIME_SECONDS,
            MessageSystemAttributeNames: ['ApproximateReceiveCount'],
          }),
          { abortSignal: signal },
        );
        messages = out.Messages ?? [];
        failures = 0;
      } catch (err) {
        if (signal.aborted) break;
        failures++;
        const retryInMs = Math.min(RECEIVE_BACKOFF_MS * 2 ** (failures - 1), MAX_RECEIVE_BACKOFF_MS);
        logger.error('sqs receive failed', { queueUrl, retryInMs, err: err as Error });
        await sleep(retryInMs, undefined, { signal }).catch(() => undefined);
        continue;
      }
      if (messages.length > 0) await this.#take(messages);
    }
    logger.info('sqs source stopped', { queueUrl });
  }

  /** Ingests each message's event (the ingest groups them into commits) and deletes those taken. */
  async #take(messages: readonly Message[]): Promise<void> {
    const taken: Message[] = [];
    await Promise.all(
      messages.map(async (message) => {
        if (await this.#ingestOne(message)) taken.push(message);
      }),
    );
    if (taken.length > 0) await this.#delete(taken);
  }

  /** True when the message's event is committed, a duplicate or ignored: done with, to be deleted. */
  async #ingestOne(message: Message): Promise<boolean> {
    const { logger, metrics } = this.#opts;
    const about = {
      messageId: message.MessageId,
      receiveCount: Number(message.Attributes?.ApproximateReceiveCount ?? 0) || undefined,
    };
    const refuse = (reason: string): false => {
      logger.warn('sqs message refused; left for the queue’s redrive policy', { ...about, reason });
      return false;
    };
    let event: unknown;
    try {
      event = JSON.parse(message.Body ?? '');
    } catch {
      metrics.inc('broker_events_total', { outcome: 'refused' });
      return refuse('the body is not JSON');
    }
    // One event per message: an array would be several, which no EventBridge target sends.
    if (Array.isArray(event)) {
      metrics.inc('broker_events_total', { outcome: 'refused' });
      return refuse('the body is an array, not one EventBridge event');
    }
    try {
      await this.#opts.ingest(event);
      return true;
    } catch (err) {
      // Not an event (the ingest counted it as refused), or the store failed: the message comes
      // back after its visibility timeout either way.
      if (err instanceof BrokerError && err.code === 'INVALID_EVENT') return refuse(err.message);
      logger.error('sqs message not taken; it comes back after its visibility timeout', {
        ...about,
        err: err as Error,
      });
      return false;
    }
  }

  async #delete(messages: readonly Message[]): Promise<void> {
    const { client, queueUrl, logger } = this.#opts;
    const byId = new Map(messages.map((m, i) => [String(i), m]));
    let failed: { id: string; code: string }[];
    try {
      const out = await client.send(
        new DeleteMessageBatchCommand({
          QueueUrl: queueUrl,
          Entries: [...byId].map(([Id, m]) => ({ Id, ReceiptHandle: m.ReceiptHandle })),
        }),
      );
      failed = (out.Failed ?? []).map((f) => ({ id: f.Id ?? '', code: f.Code ?? 'unknown' }));
    } catch (err) {
      failed = [...byId.keys()].map((id) => ({ id, code: (err as Error).name || 'request failed' }));
    }
    // Committed already: when SQS hands it out again, its EventBridge id makes it a duplicate.
    for (const { id, code } of failed) {
      logger.warn('sqs message not deleted; it comes back and counts as a duplicate', {
        messageId: byId.get(id)?.MessageId,
        code,
      });
    }
  }
}
