import type { ReadResult } from '../content/fhir-reader.js';
import { BrokerError } from '../core/errors.js';
import { matchesContent, type SearchParameterCatalog } from '../core/search-filter.js';
import type { MatchSpec, ResourceChange } from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { AcceptItem } from '../store/store.js';

/**
 * Stage two of matching, between stage one (the index, on what the event carries) and the commit.
 * Candidates whose subscription has content filters keep their place only if the filters hold on
 * the resource as the FHIR server holds it; each resource is read once per request however many
 * subscriptions ask. Events no such subscription could match pass through untouched and unread.
 *
 * It runs before the commit, so "matched once, when it arrives" holds and event numbers stay
 * gapless: a notification exists only for a change that matched. When a resource cannot be read
 * now, the whole request fails with a 503 and nothing is stored: the sender (EventBridge, the SQS
 * source) delivers it again later, and the duplicate check keeps a retry from doubling anything.
 * Nothing is ever delivered unfiltered.
 */

export interface ResourceSource {
  read(change: ResourceChange): Promise<ReadResult>;
}

/** Reads in flight at once for one request. */
const READS_AT_ONCE = 16;

export class ContentStage {
  readonly #catalog: SearchParameterCatalog | undefined;
  readonly #reader: ResourceSource | undefined;
  readonly #isUnavailable: (err: unknown) => boolean;
  readonly #logger: Logger;
  readonly #metrics: Metrics;

  /**
   * Without a reader (`BROKER_FHIR_READ` unset) no subscription can be registered with content
   * filters; one stored by a broker that had it gets nothing until it is set again, and each
   * request says so in the log.
   */
  constructor(deps: {
    catalog?: SearchParameterCatalog;
    reader?: ResourceSource;
    /** The reader's "cannot read now" error (a 503), as opposed to a fault of the broker. */
    isUnavailable: (err: unknown) => boolean;
    logger: Logger;
    metrics: Metrics;
  }) {
    this.#catalog = deps.catalog;
    this.#reader = deps.reader;
    this.#isUnavailable = deps.isUnavailable;
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
  }

  /**
   * `items` with each candidate list narrowed to the subscriptions whose content filters hold;
   * `items` itself, synchronously, when no candidate has content filters (the common case costs a
   * look-up per candidate, not a promise).
   */
  narrow(
    items: readonly AcceptItem[],
    specOf: (id: string) => MatchSpec | undefined,
  ): readonly AcceptItem[] | Promise<AcceptItem[]> {
    const checks: { index: number; filtered: string[] }[] = [];
    items.forEach((item, index) => {
      let filtered: string[] | undefined;
      for (const id of item.subscriptionIds) {
        if (specOf(id)?.content === undefined) continue;
        filtered ??= [];
        filtered.push(id);
      }
      if (filtered !== undefined) checks.push({ index, filtered });
    });
    return checks.length === 0 ? items : this.#narrowRead(items, checks, specOf);
  }

  async #narrowRead(
    items: readonly AcceptItem[],
    checks: readonly { index: number; filtered: string[] }[],
    specOf: (id: string) => MatchSpec | undefined,
  ): Promise<AcceptItem[]> {
    const resources = await this.#readAll(checks.map((c) => (items[c.index] as AcceptItem).change));
    const out = [...items];
    checks.forEach(({ index, filtered }, k) => {
      const item = items[index] as AcceptItem;
      const resource = resources[k];
      const checked = new Set(filtered);
      const keep = new Set(
        resource === undefined || this.#catalog === undefined
          ? []
          : filtered.filter((id) =>
              matchesContent(
                resource,
                specOf(id)?.content ?? [],
                this.#catalog as SearchParameterCatalog,
                item.change.fhirBase,
              ),
            ),
      );
      this.#metrics.inc('broker_content_matches_total', { outcome: 'matched' }, keep.size);
      this.#metrics.inc('broker_content_matches_total', { outcome: 'not_matched' }, filtered.length - keep.size);
      out[index] = { ...item, subscriptionIds: item.subscriptionIds.filter((id) => keep.has(id) || !checked.has(id)) };
    });
    return out;
  }

  /** One read per distinct (server, resource, deleted or not); `undefined` where there is nothing to match. */
  async #readAll(changes: readonly ResourceChange[]): Promise<(Record<string, unknown> | undefined)[]> {
    const reader = this.#reader;
    if (reader === undefined) {
      this.#logger.warn('subscriptions with content filters left out: BROKER_FHIR_READ is not set', {
        events: changes.length,
      });
      this.#metrics.inc('broker_content_reads_total', { outcome: 'unconfigured' }, changes.length);
      return changes.map(() => undefined);
    }
    const keyOf = (c: ResourceChange) =>
      `${c.fhirBase}\n${c.resourceType}\n${c.resourceId ?? ''}\n${c.interaction === 'delete' ? 'd' : ''}`;
    const distinct = new Map<string, ResourceChange>();
    for (const c of changes) if (!distinct.has(keyOf(c))) distinct.set(keyOf(c), c);
    const queue = [...distinct.entries()];
    const read = new Map<string, Record<string, unknown> | undefined>();
    let failure: unknown;
    const worker = async () => {
      for (let next = queue.shift(); next !== undefined && failure === undefined; next = queue.shift()) {
        const [key, change] = next;
        try {
          read.set(key, await this.#readOne(reader, change));
        } catch (err) {
          failure ??= err;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(READS_AT_ONCE, queue.length) }, worker));
    if (failure !== undefined) {
      if (!this.#isUnavailable(failure)) throw failure;
      this.#metrics.inc('broker_content_reads_total', { outcome: 'failed' });
      this.#logger.warn('a changed resource could not be read for content filters; the sender will retry', {
        err: failure as Error,
      });
      throw new BrokerError(
        'CONTENT_UNAVAILABLE',
        `A changed resource could not be read from the FHIR server to evaluate content filters; retry (${(failure as Error).message})`,
        { cause: failure },
      );
    }
    return changes.map((c) => read.get(keyOf(c)));
  }

  async #readOne(reader: ResourceSource, change: ResourceChange): Promise<Record<string, unknown> | undefined> {
    if (change.resourceId === undefined) {
      // An older event without a resource id: nothing to read, so no content filter can hold.
      this.#metrics.inc('broker_content_reads_total', { outcome: 'no_id' });
      return undefined;
    }
    const read = await reader.read(change);
    if ('resource' in read) {
      this.#metrics.inc('broker_content_reads_total', { outcome: 'read' });
      return read.resource;
    }
    this.#metrics.inc('broker_content_reads_total', { outcome: 'missing' });
    this.#logger.info('changed resource not found on the FHIR server: no content filter holds', {
      eventId: change.eventId,
      resourceType: change.resourceType,
      reason: read.missing,
    });
    return undefined;
  }
}
