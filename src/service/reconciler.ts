import { createHash } from 'node:crypto';
import { R4_RESOURCE_TYPES } from '../core/resource-types.js';
import type { ResourceChange, SubscriptionRecord, SubscriptionStatus } from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { AcceptItem, Store } from '../store/store.js';
import type { FoundChange } from './ingest.js';

/**
 * Reconciliation: changes whose CloudTrail event never reached the broker are found on the FHIR
 * server and notified through the same pipeline. CloudTrail's delivery to EventBridge is best
 * effort, a `ProcessBundle` (batch or transaction Bundle) event names none of the resources it
 * wrote, and older events carry no resource id: each is a change subscribers would miss.
 *
 * Each run reads, for every resource type a subscription could match, the resources the server
 * last updated in the window [checkpoint, now − lag) (a search on `_lastUpdated`), page by page.
 * A found resource is matched like an event (stage one on type, interaction and id; content
 * filters judged on the resource found, not read again); a matched subscription is notified only
 * if it existed when the change happened and holds no notification about that resource from that
 * moment on (its own event, or an earlier run's). The checkpoint moves past a window only once the
 * whole window is done, so a run that fails (the server unreachable) is done again by the next.
 *
 * What it cannot see: deletes (a search finds no deleted resource), and versions overwritten
 * within the window (the search finds the current one; a subscriber told of it is told the
 * resource changed). A change is notified twice when its CloudTrail event arrives later than the
 * lag (the event's id is another than the reconciler's), which at-least-once delivery allows.
 */

/** Reads what a FHIR server changed (the `FhirReader`; tests: any server). */
export interface ChangeFeed {
  /**
   * The resources of `type` whose `meta.lastUpdated` is in [fromMs, toMs), as the server holds
   * them now, page by page. Throws when the server cannot answer (the run fails and is done again).
   */
  changed(type: string, fromMs: number, toMs: number, signal: AbortSignal): AsyncIterable<readonly FoundResource[]>;
}

export interface FoundResource {
  readonly resource: Record<string, unknown>;
}

/** What the reconciler needs of the ingest pipeline (`IngestService.acceptFound`). */
export interface FoundChangeSink {
  acceptFound(
    found: readonly FoundChange[],
    select: (items: readonly AcceptItem[]) => Promise<AcceptItem[]>,
  ): Promise<{ readonly notifications: number }>;
}

export interface ReconcileReport {
  /** The window done, epoch ms; absent when there was none to do (the first run sets the checkpoint). */
  readonly from?: number;
  readonly to?: number;
  readonly found: number;
  readonly notifications: number;
}

/**
 * A change's event time (CloudTrail: whole seconds, when the call came in) is before the version's
 * `meta.lastUpdated` (when the server stored it) by up to a second plus the call's duration: a
 * notification whose change is this much older than the version still counts as about it.
 */
export const VERSION_SLACK_MS = 2000;

/** Statuses that collect notifications (the matching index's). */
const COLLECTING: readonly SubscriptionStatus[] = ['requested', 'active', 'error'];

/** Found resources judged and committed together (a search page is asked for with this `_count`). */
export const PAGE = 100;

export class Reconciler {
  readonly #store: Store;
  readonly #sink: FoundChangeSink;
  readonly #feed: ChangeFeed;
  readonly #now: () => number;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #base: string;
  readonly #datastoreId: string;
  readonly #source: string;
  readonly #everyMs: number;
  readonly #lagMs: number;
  readonly #closing = new AbortController();
  #timer: NodeJS.Timeout | undefined;
  #running: Promise<ReconcileReport> | undefined;
  #checkpoint: number | undefined;

  constructor(deps: {
    store: Store;
    sink: FoundChangeSink;
    feed: ChangeFeed;
    now: () => number;
    logger: Logger;
    metrics: Metrics;
    /** The FHIR base URL read (`BROKER_FHIR_READ`): the focus of every change found. */
    base: string;
    everyMs: number;
    lagMs: number;
  }) {
    this.#store = deps.store;
    this.#sink = deps.sink;
    this.#feed = deps.feed;
    this.#now = deps.now;
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
    this.#base = deps.base.replace(/\/+$/, '');
    this.#datastoreId = /\/datastore\/([0-9a-f]{32})\/r4$/.exec(this.#base)?.[1] ?? '';
    // One checkpoint per server read: another BROKER_FHIR_READ starts its own from the present.
    this.#source = `fhir:${createHash('sha256').update(this.#base).digest('hex').slice(0, 32)}`;
    this.#everyMs = deps.everyMs;
    this.#lagMs = deps.lagMs;
    for (const outcome of ['notified', 'already_notified', 'not_matched', 'skipped']) {
      this.#metrics.inc('broker_reconcile_resources_total', { outcome }, 0);
    }
    for (const outcome of ['completed', 'failed']) this.#metrics.inc('broker_reconcile_runs_total', { outcome }, 0);
    this.#metrics.gauge('broker_reconcile_checkpoint_age_seconds', () =>
      this.#checkpoint === undefined ? 0 : Math.max(0, Math.round((this.#now() - this.#checkpoint) / 1000)),
    );
  }

  /** Runs now and then every `everyMs` (a run never overlaps the one before). */
  start(): void {
    if (this.#timer !== undefined || this.#closing.signal.aborted) return;
    const tick = () => {
      void this.run().finally(() => {
        if (!this.#closing.signal.aborted) {
          this.#timer = setTimeout(tick, this.#everyMs);
          this.#timer.unref();
        }
      });
    };
    this.#timer = setTimeout(tick, 0);
    this.#timer.unref();
  }

  /**
   * One run: every window from the checkpoint to now − lag. Never throws: a failure is logged and
   * counted, and the next run starts from the last window done. A run asked for while one is under
   * way answers that one. `signal` stops it between two pages (a Lambda invocation's time running
   * out): the windows done are kept, the one under way is done again by the next run.
   */
  run(options: { signal?: AbortSignal } = {}): Promise<ReconcileReport> {
    const signal =
      options.signal === undefined ? this.#closing.signal : AbortSignal.any([this.#closing.signal, options.signal]);
    this.#running ??= this.#run(signal).finally(() => {
      this.#running = undefined;
    });
    return this.#running;
  }

  /** Stops the timer and a run under way (between two pages); resolves once it has stopped. */
  async close(): Promise<void> {
    this.#closing.abort();
    clearTimeout(this.#timer);
    await this.#running;
  }

  async #run(signal: AbortSignal): Promise<ReconcileReport> {
    const to = this.#now() - this.#lagMs;
    let found = 0;
    let notifications = 0;
    let from: number | undefined;
    try {
      from = await this.#store.reconcileCheckpoint(this.#source);
      if (from === undefined) {
        // Reconciliation starts now: the changes before it were the events' to notify.
        await this.#store.saveReconcileCheckpoint(this.#source, to);
        this.#checkpoint = to;
        this.#logger.info('reconciliation starts', { base: this.#base, from: new Date(to).toISOString() });
        this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'completed' });
        return { found: 0, notifications: 0 };
      }
      this.#checkpoint = from;
      if (from >= to) {
        this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'completed' });
        return { found: 0, notifications: 0 };
      }
      const types = await this.#types();
      // Windows of at most `everyMs`: after a long stop the checkpoint moves on as each is done.
      for (let start = from; start < to && !signal.aborted; ) {
        const end = Math.min(start + this.#everyMs, to);
        for (const type of types) {
          for await (const page of this.#feed.changed(type, start, end, signal)) {
            const done = await this.#reconcilePage(type, page, start, end);
            found += done.found;
            notifications += done.notifications;
            if (signal.aborted) break;
          }
          if (signal.aborted) break;
        }
        if (signal.aborted) break;
        await this.#store.saveReconcileCheckpoint(this.#source, end);
        this.#checkpoint = end;
        start = end;
      }
      this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'completed' });
      if (found > 0 || notifications > 0) {
        this.#logger.info('reconciled', {
          from: new Date(from).toISOString(),
          to: new Date(to).toISOString(),
          found,
          notifications,
        });
      }
      return { from, to, found, notifications };
    } catch (err) {
      if (signal.aborted) {
        this.#logger.info('reconciliation stopped; the next run goes on from the last window done', {
          ...(this.#checkpoint === undefined ? {} : { checkpoint: new Date(this.#checkpoint).toISOString() }),
        });
        return { ...(from === undefined ? {} : { from }), to, found, notifications };
      }
      this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'failed' });
      this.#logger.warn('reconciliation failed; the next run starts from the last window done', {
        err: err as Error,
        ...(this.#checkpoint === undefined ? {} : { checkpoint: new Date(this.#checkpoint).toISOString() }),
      });
      return { ...(from === undefined ? {} : { from }), to, found, notifications };
    }
  }

  /** The resource types a subscription collecting notifications could match; every type for `*`. */
  async #types(): Promise<readonly string[]> {
    const types = new Set<string>();
    for (const rec of await this.#store.listSubscriptions()) {
      if (!COLLECTING.includes(rec.status)) continue;
      const wanted = rec.match.resourceTypes;
      if (wanted === '*') return [...R4_RESOURCE_TYPES].sort();
      for (const t of wanted) types.add(t);
    }
    return [...types].sort();
  }

  async #reconcilePage(
    type: string,
    page: readonly FoundResource[],
    from: number,
    to: number,
  ): Promise<{ found: number; notifications: number }> {
    const found: FoundChange[] = [];
    for (const { resource } of page) {
      const change = this.#changeOf(type, resource, from, to);
      if (change === undefined) this.#metrics.inc('broker_reconcile_resources_total', { outcome: 'skipped' });
      else found.push({ change, read: { resource, base: this.#base } });
    }
    let notifications = 0;
    for (let i = 0; i < found.length; i += PAGE) {
      const chunk = found.slice(i, i + PAGE);
      let matched = 0;
      let selected = 0;
      const done = await this.#sink.acceptFound(chunk, async (items) => {
        const kept = await this.#unnotified(items);
        matched = items.length;
        selected = kept.length;
        return kept;
      });
      notifications += done.notifications;
      this.#metrics.inc('broker_reconcile_resources_total', { outcome: 'notified' }, selected);
      this.#metrics.inc('broker_reconcile_resources_total', { outcome: 'already_notified' }, matched - selected);
      this.#metrics.inc('broker_reconcile_resources_total', { outcome: 'not_matched' }, chunk.length - matched);
    }
    return { found: found.length, notifications };
  }

  /**
   * The change a found resource stands for, or undefined when it is not one to trust: another type,
   * an id that is no FHIR id, no `meta.lastUpdated`, or one outside the window (a server that
   * ignored the `_lastUpdated` search parameter must not have everything it holds notified).
   */
  #changeOf(type: string, resource: Record<string, unknown>, from: number, to: number): ResourceChange | undefined {
    const id = resource.id;
    const meta = resource.meta as { versionId?: unknown; lastUpdated?: unknown } | undefined;
    const at = typeof meta?.lastUpdated === 'string' ? Date.parse(meta.lastUpdated) : Number.NaN;
    if (resource.resourceType !== type || typeof id !== 'string' || !/^[A-Za-z0-9\-.]{1,64}$/.test(id)) {
      return undefined;
    }
    if (!(at >= from && at < to)) return undefined;
    const version = typeof meta?.versionId === 'string' && meta.versionId.length <= 64 ? meta.versionId : undefined;
    return {
      // The same version found twice (a window done again after a crash) is one event.
      eventId: `reconcile:${this.#source}:${type}/${id}/_history/${version ?? `@${at}`}`,
      resourceType: type,
      resourceId: id,
      // A first version is a create; any later one an update (a resource created and updated within
      // the window is found at its update).
      interaction: version === '1' ? 'create' : 'update',
      datastoreId: this.#datastoreId,
      fhirBase: this.#base,
      time: new Date(at).toISOString(),
    };
  }

  /**
   * Of each matched item, the subscriptions to notify: those that existed when the change happened
   * and hold no notification about the resource from then on.
   */
  async #unnotified(items: readonly AcceptItem[]): Promise<AcceptItem[]> {
    const created = new Map<string, number>();
    const records = await Promise.all(
      [...new Set(items.flatMap((i) => i.subscriptionIds))].map((id) => this.#store.getSubscription(id)),
    );
    for (const rec of records.filter((r): r is SubscriptionRecord => r !== undefined)) {
      created.set(rec.id, Date.parse(rec.createdAt));
    }
    const candidates = items.flatMap((item) => {
      const at = Date.parse(item.change.time);
      return item.subscriptionIds
        .filter((id) => (created.get(id) ?? Number.POSITIVE_INFINITY) <= at)
        .map((subscriptionId) => ({ item, subscriptionId, since: at - VERSION_SLACK_MS }));
    });
    const told = await this.#store.notifiedSince(
      candidates.map((c) => ({
        subscriptionId: c.subscriptionId,
        resourceType: c.item.change.resourceType,
        resourceId: c.item.change.resourceId as string,
        since: c.since,
      })),
    );
    const keep = new Map<AcceptItem, string[]>();
    candidates.forEach((c, i) => {
      if (told[i] === true) return;
      const ids = keep.get(c.item) ?? [];
      ids.push(c.subscriptionId);
      keep.set(c.item, ids);
    });
    return [...keep].map(([item, subscriptionIds]) => ({ ...item, subscriptionIds }));
  }
}
