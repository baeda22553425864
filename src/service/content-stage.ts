import { BrokerError } from '../core/errors.js';
import { type ContentFilter, matchesContent, type SearchParameterCatalog } from '../core/search-filter.js';
import { mayHaveFullResources } from '../core/subscription.js';
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
 *
 * The same read serves `full-resource` subscriptions: the resource as read goes into their
 * notifications (stored with them, so a retry, a restart and `$events` send the same bytes), while
 * their owner is one of `BROKER_FULL_RESOURCE_CLIENTS`. A delete carries none; a resource the
 * server no longer has, or one over `MAX_FULL_RESOURCE_BYTES`, is notified without it (logged and
 * counted), as id-only content would be.
 */

/**
 * The largest resource a notification carries (its JSON, in UTF-8 bytes). It is stored with each
 * full-resource notification: a DynamoDB item holds at most 400 KB.
 */
export const MAX_FULL_RESOURCE_BYTES = 256 * 1024;

/**
 * What a read answers: the resource with the base it was read from (references to that server
 * count as local), or why there is nothing to judge.
 */
export type ReadResult =
  /** `gone`: the server had deleted it since the change; `resource` is its last version (history). */
  | { readonly resource: Record<string, unknown>; readonly base: string; readonly gone?: true }
  /** `anomaly`: the server answered something that is not a resource (logged at warn, not info). */
  | { readonly missing: string; readonly anomaly?: true };

/** A read that cannot be done now (the server unreachable, slow, refusing for now): the request is a 503. */
export class ContentUnavailableError extends Error {}

/** Reads changed resources; throws `ContentUnavailableError` when one cannot be read now. */
export interface ResourceSource {
  read(change: ResourceChange): Promise<ReadResult>;
}

interface Check {
  readonly index: number;
  /** The candidates with content filters, and those filters as they were when stage one chose them. */
  readonly filtered: readonly { readonly id: string; readonly content: readonly ContentFilter[] }[];
  /** The candidates whose notifications carry the resource. */
  readonly full: readonly string[];
}

type Read = Extract<ReadResult, { readonly resource: unknown }>;

/**
 * Reads in flight at once for one request (the reader caps them per process too): a request of many
 * events takes turns with the others instead of queueing all its reads ahead of theirs.
 */
const READS_AT_ONCE = 16;

export class ContentStage {
  readonly #catalog: SearchParameterCatalog | undefined;
  readonly #reader: ResourceSource | undefined;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #fullResourceClients: readonly string[] | '*';

  /**
   * Without a reader (`BROKER_FHIR_READ` unset) no subscription can be registered with content
   * filters; one stored by a broker that had it gets nothing until it is set again, and each
   * request says so in the log.
   */
  constructor(deps: {
    catalog?: SearchParameterCatalog;
    reader?: ResourceSource;
    /** `BROKER_FULL_RESOURCE_CLIENTS`: whose full-resource subscriptions get the resource now. */
    fullResourceClients?: readonly string[] | '*';
    logger: Logger;
    metrics: Metrics;
  }) {
    this.#catalog = deps.catalog;
    this.#reader = deps.reader;
    this.#fullResourceClients = deps.fullResourceClients ?? [];
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
  }

  /**
   * `items` with each candidate list narrowed to the subscriptions whose content filters hold, and
   * the resource for those of them that take it whole; `items` itself, synchronously, when no
   * candidate has content filters or full-resource content (the common case costs a look-up per
   * candidate, not a promise). Resources come from `source`: the FHIR server, or what the
   * reconciler found there.
   */
  narrow(
    items: readonly AcceptItem[],
    specOf: (id: string) => MatchSpec | undefined,
    source: ResourceSource | undefined = this.#reader,
  ): readonly AcceptItem[] | Promise<AcceptItem[]> {
    const checks: Check[] = [];
    items.forEach((item, index) => {
      let filtered: { id: string; content: readonly ContentFilter[] }[] | undefined;
      let full: string[] | undefined;
      let unnamed = false;
      for (const id of item.subscriptionIds) {
        // The filters as stage one saw the subscription: one updated during the read is judged by
        // what it was when the event was matched, never by another spec (or none).
        const spec = specOf(id);
        if (spec === undefined) continue;
        if (spec.content !== undefined) {
          filtered ??= [];
          filtered.push({ id, content: spec.content });
        }
        // A delete carries no resource.
        if (spec.fullResource === undefined || item.change.interaction === 'delete') continue;
        if (item.change.resourceId === undefined) unnamed = true;
        else if (mayHaveFullResources(this.#fullResourceClients, spec.fullResource.owner)) {
          full ??= [];
          full.push(id);
        } else {
          this.#metrics.inc('broker_full_resources_total', { outcome: 'not_allowed' });
        }
      }
      if (unnamed) {
        // An older event that names no resource: nothing to read, the notification goes without.
        this.#metrics.inc('broker_full_resources_total', { outcome: 'missing' });
        this.#logger.info('full-resource notifications without the resource: the event names no resource id', {
          eventId: item.change.eventId,
          resourceType: item.change.resourceType,
        });
      }
      if (filtered !== undefined || full !== undefined)
        checks.push({ index, filtered: filtered ?? [], full: full ?? [] });
    });
    return checks.length === 0 ? items : this.#narrowRead(items, checks, source);
  }

  async #narrowRead(
    items: readonly AcceptItem[],
    checks: readonly Check[],
    source: ResourceSource | undefined,
  ): Promise<AcceptItem[]> {
    const reads = await this.#readAll(
      checks.map((c) => (items[c.index] as AcceptItem).change),
      source,
    );
    const out = [...items];
    checks.forEach(({ index, filtered, full }, k) => {
      const item = items[index] as AcceptItem;
      const read = reads[k];
      const catalog = this.#catalog;
      const judge = read === undefined || catalog === undefined ? undefined : this.#judge(read, catalog, item.change);
      const verdicts = filtered.map((f) => judge?.(f.content));
      const keep = new Set(filtered.filter((_f, i) => verdicts[i] === true).map((f) => f.id));
      const checked = new Set(filtered.map((f) => f.id));
      if (judge !== undefined) {
        const count = (v: boolean | 'unevaluable') => verdicts.filter((x) => x === v).length;
        this.#metrics.inc('broker_content_matches_total', { outcome: 'matched' }, count(true));
        this.#metrics.inc('broker_content_matches_total', { outcome: 'not_matched' }, count(false));
        this.#metrics.inc('broker_content_matches_total', { outcome: 'unevaluable' }, count('unevaluable'));
      }
      const subscriptionIds = item.subscriptionIds.filter((id) => keep.has(id) || !checked.has(id));
      const takers = full.filter((id) => keep.has(id) || !checked.has(id));
      const json = takers.length === 0 ? undefined : this.#fullResource(read, item.change);
      const change =
        json !== undefined && read?.gone === true ? { ...item.change, resourceGone: true as const } : item.change;
      out[index] =
        json === undefined
          ? { change, subscriptionIds }
          : { change, subscriptionIds, resource: { json, for: new Set(takers) } };
    });
    return out;
  }

  /** The resource's JSON for full-resource notifications, or `undefined` (said why) when they go without. */
  #fullResource(read: Read | undefined, change: ResourceChange): string | undefined {
    if (read === undefined) {
      this.#metrics.inc('broker_full_resources_total', { outcome: 'missing' });
      return undefined;
    }
    const json = JSON.stringify(read.resource);
    const bytes = Buffer.byteLength(json);
    if (bytes > MAX_FULL_RESOURCE_BYTES) {
      this.#metrics.inc('broker_full_resources_total', { outcome: 'too_large' });
      this.#logger.warn('a changed resource is too large to carry: its full-resource notifications go without it', {
        eventId: change.eventId,
        resourceType: change.resourceType,
        bytes,
        limit: MAX_FULL_RESOURCE_BYTES,
      });
      return undefined;
    }
    this.#metrics.inc('broker_full_resources_total', { outcome: 'included' });
    return json;
  }

  /**
   * Decides filters on one resource. Each parameter's values are taken from the resource once and
   * shared by every subscription that filters on it (ten thousand subscriptions on `patient` cost
   * one FHIRPath evaluation). An evaluation that throws (a resource the engine cannot walk, such as
   * a `reference` that is a number, or nested too deep) holds for no filter: logged, counted, never
   * delivered, and the event still goes to every other subscription.
   */
  #judge(
    read: Read,
    catalog: SearchParameterCatalog,
    change: ResourceChange,
  ): (content: readonly ContentFilter[]) => boolean | 'unevaluable' {
    // Per parameter: its values, or the error its evaluation threw (the same for every subscription).
    const memo = new Map<string, readonly unknown[] | Error>();
    const shared: SearchParameterCatalog = {
      lookup: (type, code) => catalog.lookup(type, code),
      values: (resource, code) => {
        if (resource !== read.resource) throw new Error('the content stage judges one resource at a time');
        let values = memo.get(code);
        if (values === undefined) {
          try {
            values = catalog.values(resource, code);
          } catch (err) {
            values = err instanceof Error ? err : new Error(String(err));
            this.#logger.warn(
              'a changed resource could not be evaluated for a content filter: the filter does not hold',
              {
                eventId: change.eventId,
                resourceType: change.resourceType,
                parameter: code,
                reason: values.message.slice(0, 200),
              },
            );
          }
          memo.set(code, values);
        }
        if (values instanceof Error) throw values;
        return values;
      },
    };
    // A subscription whose filters need a parameter that cannot be evaluated is not notified; the
    // others are judged on their own parameters, whatever the order.
    return (content) => {
      try {
        return matchesContent(read.resource, content, shared, read.base);
      } catch {
        return 'unevaluable';
      }
    };
  }

  /** One read per distinct (server, resource, deleted or not); `undefined` where there is nothing to match. */
  async #readAll(
    changes: readonly ResourceChange[],
    reader: ResourceSource | undefined,
  ): Promise<(Read | undefined)[]> {
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
    const read = new Map<string, Read | undefined>();
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
      if (!(failure instanceof ContentUnavailableError)) throw failure;
      this.#metrics.inc('broker_content_reads_total', { outcome: 'failed' });
      this.#logger.warn(
        'a changed resource could not be read (content filters, full-resource); the sender will retry',
        {
          err: failure as Error,
        },
      );
      throw new BrokerError(
        'CONTENT_UNAVAILABLE',
        `A changed resource could not be read from the FHIR server for content filters or full-resource content; retry (${(failure as Error).message})`,
        { cause: failure },
      );
    }
    return changes.map((c) => read.get(keyOf(c)));
  }

  async #readOne(reader: ResourceSource, change: ResourceChange): Promise<Read | undefined> {
    if (change.resourceId === undefined) {
      // An older event without a resource id: nothing to read, so no content filter can hold.
      this.#metrics.inc('broker_content_reads_total', { outcome: 'no_id' });
      return undefined;
    }
    const read = await reader.read(change);
    if ('resource' in read) {
      this.#metrics.inc('broker_content_reads_total', { outcome: 'read' });
      return read;
    }
    this.#metrics.inc('broker_content_reads_total', { outcome: 'missing' });
    const fields = { eventId: change.eventId, resourceType: change.resourceType, reason: read.missing };
    if (read.anomaly === true) {
      this.#logger.warn(
        'the FHIR server answered something other than the changed resource: no content filter holds, no resource carried',
        fields,
      );
    } else {
      this.#logger.info(
        'changed resource not found on the FHIR server: no content filter holds, no resource carried',
        fields,
      );
    }
    return undefined;
  }
}
