import type { Logger } from '../../src/observability/logger.js';
import { Waiters } from './waiters.js';

/** A Logger that keeps every record, so in-process tests can wait for what the broker reports. */
export class RecordingLogger implements Logger {
  readonly records: Record<string, unknown>[] = [];
  readonly #waiters = new Waiters();

  debug(msg: string, fields?: Record<string, unknown>): void {
    this.#add('debug', msg, fields);
  }
  info(msg: string, fields?: Record<string, unknown>): void {
    this.#add('info', msg, fields);
  }
  warn(msg: string, fields?: Record<string, unknown>): void {
    this.#add('warn', msg, fields);
  }
  error(msg: string, fields?: Record<string, unknown>): void {
    this.#add('error', msg, fields);
  }

  /** Waits for a record at index `since` or later that satisfies `predicate`. */
  waitFor(
    predicate: (rec: Record<string, unknown>) => boolean,
    what: string,
    timeoutMs = 15_000,
    since = 0,
  ): Promise<Record<string, unknown>> {
    return this.#waiters.until(() => this.records.slice(since).find(predicate), `log: ${what}`, timeoutMs);
  }

  waitForStatus(id: string, status: string, timeoutMs?: number, since = 0): Promise<Record<string, unknown>> {
    return this.waitFor(
      (r) => r.msg === 'subscription status changed' && r.subscription === id && r.to === status,
      `Subscription/${id} → ${status}`,
      timeoutMs,
      since,
    );
  }

  /** The index the next record will have: pass it as `since` to wait for something new. */
  mark(): number {
    return this.records.length;
  }

  #add(level: string, msg: string, fields?: Record<string, unknown>): void {
    this.records.push({ level, msg, ...fields });
    this.#waiters.wake();
  }
}
