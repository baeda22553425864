import { setTimeout as sleep } from 'node:timers/promises';
import {
  ChangeMessageVisibilityBatchCommand,
  DeleteMessageBatchCommand,
  type Message,
  ReceiveMessageCommand,
  type SQSClient,
} from '@aws-sdk/client-sqs';
import { BrokerError } from '../core/errors.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { IngestOptions, IngestResult } from '../service/ingest.js';

/**
 * Events pulled from an Amazon SQS queue (an EventBridge rule's target) instead of pushed to
 * `POST /events`: for a broker behind a firewall, which reaches out to SQS and exposes nothing.
 *
 * Long polls of up to 10 messages; each message body is one EventBridge event, taken through the
 * same ingest as `POST /events` (validated, matched, committed with its notifications). A message
 * is deleted only once its event is committed (or was a duplicate or ignored), so a crash or a
 * shutdown before that leaves it in the queue: SQS hands it out again after its visibility timeout,
 * and the EventBridge `id` deduplicates a copy that was committed before the delete. One the store
 * failed to take is kept in hand and tried again (see #take). A message that is not an event (not JSON, or not an EventBridge event) is logged and left
 * in the queue too: the queue's redrive policy moves it to its dead-letter queue after
 * `maxReceiveCount` receives, where it can be looked at (README, "Pulling events from SQS").
 */

/** 20 s: SQS's longest long poll (fewest empty receives). */
export const SQS_WAIT_TIME_SECONDS = 20;
/** SQS's most per receive and per delete batch. */
const MAX_MESSAGES = 10;
/** After a failed receive, or a store that failed to take messages: 1 s, doubling, at most 30 s. */
const BACKOFF_MS = 1_000;
const MAX_BACKOFF_MS = 30_000;
/** A message kept in hand stays invisible this much longer than the wait before its next try. */
const VISIBILITY_MARGIN_SECONDS = 30;
/** Refused message ids remembered (a queue's redrive policy takes them after a few receives). */
const REFUSED_KEPT = 10_000;

function backoff(failures: number): number {
  return Math.min(BACKOFF_MS * 2 ** (failures - 1), MAX_BACKOFF_MS);
}

export interface SqsSourceOptions {
  readonly client: Pick<SQSClient, 'send'>;
  readonly queueUrl: string;
  readonly ingest: (body: unknown, opts?: IngestOptions) => Promise<IngestResult>;
  readonly logger: Logger;
  readonly metrics: Metrics;
  /** Long poll length (tests shorten it); SQS allows 0–20. */
  readonly waitTimeSeconds?: number;
  /**
   * Receive loops at once (default 1): each takes its batch to the end (commit, delete) before it
   * receives again, so more loops keep more batches in flight. A standard queue has no order to
   * keep; the ingest joins their events into the same group commits.
   */
  readonly pollers?: number;
}

export class SqsEventSource {
  readonly #opts: SqsSourceOptions;
  readonly #stop = new AbortController();
  #loop: Promise<void> | undefined;
  /** Ids of messages this process refused (the latest REFUSED_KEPT), so each counts once. */
  readonly #refused = new Set<string>();

  constructor(opts: SqsSourceOptions) {
    this.#opts = opts;
  }

  /** Starts polling (once). */
  start(): void {
    const pollers = Math.max(1, this.#opts.pollers ?? 1);
    this.#loop ??= (async () => {
      this.#opts.logger.info('sqs source started', { queueUrl: this.#opts.queueUrl, pollers });
      await Promise.all(Array.from({ length: pollers }, () => this.#run()));
      this.#opts.logger.info('sqs source stopped', { queueUrl: this.#opts.queueUrl });
    })();
  }

  /**
   * Stops polling: a long poll under way is cut (SQS keeps what it had not handed out), and the
   * messages already received are taken to the end, ingested and deleted, before this resolves,
   * for at most `graceMs`: a store that hangs does not hold the shutdown. Messages not deleted by
   * then come back once their visibility timeout is over (a copy already committed is a duplicate).
   */
  async close(graceMs = 5_000): Promise<void> {
    this.#stop.abort();
    if (this.#loop === undefined) return;
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => {
      timer = setTimeout(() => resolve('late'), graceMs);
    });
    const ended = await Promise.race([this.#loop.then(() => 'ended' as const), late]);
    clearTimeout(timer);
    if (ended === 'late') {
      this.#opts.logger.warn('sqs source stopped with messages still being taken; they come back from the queue', {
        queueUrl: this.#opts.queueUrl,
        graceMs,
      });
    }
  }

  async #run(): Promise<void> {
    const { client, queueUrl, logger } = this.#opts;
    const signal = this.#stop.signal;
    let failures = 0;
    while (!signal.aborted) {
      let messages: Message[];
      try {
        const out = await client.send(
          new ReceiveMessageCommand({
            QueueUrl: queueUrl,
            MaxNumberOfMessages: MAX_MESSAGES,
            WaitTimeSeconds: this.#opts.waitTimeSeconds ?? SQS_WAIT_TIME_SECONDS,
            MessageSystemAttributeNames: ['ApproximateReceiveCount'],
          }),
          { abortSignal: signal },
        );
        messages = out.Messages ?? [];
        failures = 0;
      } catch (err) {
        if (signal.aborted) break;
        failures++;
        const retryInMs = backoff(failures);
        logger.error('sqs receive failed', { queueUrl, retryInMs, err: err as Error });
        await sleep(retryInMs, undefined, { signal }).catch(() => undefined);
        continue;
      }
      if (messages.length > 0) await this.#take(messages);
    }
  }

  /**
   * Ingests each message's event (the ingest groups them into commits) and deletes those taken.
   * Those the store failed to take stay in hand and are tried again, after 1 s doubling to 30 s,
   * their visibility extended meanwhile: were they left to come back through the queue, every
   * retry would count a receive toward the redrive policy, and an outage of a few minutes would
   * send good events to the dead-letter queue. Nothing new is received meanwhile. At close they
   * are left: SQS hands them out again once the extension is over.
   */
  async #take(messages: readonly Message[]): Promise<void> {
    const { logger } = this.#opts;
    const signal = this.#stop.signal;
    let inHand = messages;
    for (let failures = 1; ; failures++) {
      const outcomes = await Promise.all(inHand.map((m) => this.#ingestOne(m)));
      const taken = inHand.filter((_, i) => outcomes[i] === 'taken');
      if (taken.length > 0) await this.#delete(taken);
      const failed = outcomes.find((o): o is { failed: Error } => typeof o === 'object');
      inHand = inHand.filter((_, i) => typeof outcomes[i] === 'object');
      if (failed === undefined || signal.aborted) return;
      const retryInMs = backoff(failures);
      const fields = { messageIds: inHand.map((m) => m.MessageId), retryInMs, err: failed.failed };
      // A content read that failed is transient and already logged where it failed (at warn).
      if (failed.failed instanceof BrokerError && failed.failed.code === 'CONTENT_UNAVAILABLE') {
        logger.warn('sqs messages not taken: a changed resource could not be read; kept and tried again', fields);
      } else {
        logger.error('sqs messages not taken: the store failed; kept and tried again', fields);
      }
      await this.#keepInvisible(inHand, Math.ceil(retryInMs / 1000) + VISIBILITY_MARGIN_SECONDS);
      await sleep(retryInMs, undefined, { signal }).catch(() => undefined);
      if (signal.aborted) return;
    }
  }

  /**
   * `taken` when the message's event is committed, a duplicate or ignored (done with: delete it);
   * `refused` when it is no event (left in the queue); `{ failed }` when the store failed.
   */
  async #ingestOne(message: Message): Promise<'taken' | 'refused' | { failed: Error }> {
    const { logger, metrics } = this.#opts;
    const about = {
      messageId: message.MessageId,
      receiveCount: Number(message.Attributes?.ApproximateReceiveCount ?? 0) || undefined,
    };
    // A refused message comes back until the redrive policy takes it: it is logged on every
    // receive (with SQS's receive count), and counted the first time this process refuses it
    // (not by the receive count alone: the first receive may have gone to a process that stopped
    // before taking it, and an SQS-compatible queue may not send the count).
    const id = message.MessageId;
    const countRefused = id === undefined || !this.#refused.has(id);
    /** `counted`: the ingest has counted it (or not) already. */
    const refuse = (reason: string, counted = false): 'refused' => {
      logger.warn("sqs message refused; left for the queue's redrive policy", { ...about, reason });
      if (!counted && countRefused) metrics.inc('broker_events_total', { outcome: 'refused' });
      if (id !== undefined) this.#noteRefused(id);
      return 'refused';
    };
    let event: unknown;
    try {
      event = JSON.parse(message.Body ?? '');
    } catch {
      return refuse('the body is not JSON');
    }
    // One event per message: an array would be several, which no EventBridge target sends.
    if (Array.isArray(event)) return refuse('the body is an array, not one EventBridge event');
    try {
      await this.#opts.ingest(event, { countRefused });
      return 'taken';
    } catch (err) {
      // Not an event (the ingest counted it as refused), or the store failed.
      if (err instanceof BrokerError && err.code === 'INVALID_EVENT') return refuse(err.message, true);
      return { failed: err as Error };
    }
  }

  #noteRefused(messageId: string): void {
    if (this.#refused.has(messageId)) return;
    if (this.#refused.size >= REFUSED_KEPT) this.#refused.delete(this.#refused.values().next().value as string);
    this.#refused.add(messageId);
  }

  /** Extends the messages' visibility timeout to `seconds` from now (a failure: they may come back sooner). */
  async #keepInvisible(messages: readonly Message[], seconds: number): Promise<void> {
    const { client, queueUrl, logger } = this.#opts;
    try {
      const out = await client.send(
        new ChangeMessageVisibilityBatchCommand({
          QueueUrl: queueUrl,
          Entries: messages.map((m, i) => ({
            Id: String(i),
            ReceiptHandle: m.ReceiptHandle,
            VisibilityTimeout: seconds,
          })),
        }),
      );
      if ((out.Failed ?? []).length > 0) {
        logger.warn('sqs visibility not extended; those messages may come back meanwhile', {
          codes: (out.Failed ?? []).map((f) => f.Code),
        });
      }
    } catch (err) {
      logger.warn('sqs visibility not extended; those messages may come back meanwhile', { err: err as Error });
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
