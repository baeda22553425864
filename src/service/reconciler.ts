import { createHash } from 'node:crypto';
import { R4_RESOURCE_TYPES } from '../core/resource-types.js';
import type {
  Interaction,
  ResourceChange,
  SubscriptionRecord,
  SubscriptionStatus,
  SubscriptionVersion,
} from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import { type AcceptItem, NOTIFIED_SCAN_SLACK_MS, type Store } from '../store/store.js';
import type { FoundChange } from './ingest.js';

/**
 * Reconciliation: changes whose CloudTrail event never reached the broker are found on the FHIR
 * server and notified through the same pipeline. CloudTrail's delivery to EventBridge is best
 * effort, a `ProcessBundle` (batch or transaction Bundle) event names none of the resources it
 * wrote, and older events carry no resource id: each is a change subscribers would miss.
 *
 * Each run reads, for every resource type a subscription could match, the resources the server
 * last updated in the window [checkpoint, now − lag) (a search on `_lastUpdated`), page by page.
 * A found resource is matched like an event, as of the moment it changed (stage one on type,
 * interaction and id, `end` at that moment; content filters judged on the resource found, not read
 * again); a matched subscription is notified only if it existed and collected notifications then,
 * and holds no notification about that resource from that moment on (its own event, or an earlier
 * run's). Each type's checkpoint moves past a window only once the whole window is done, so a run
 * that fails (the server unreachable) is done again by the next. A type whose search the server refuses
 * for good (a type it does not host, a page too large to take) is skipped for that window, said
 * and counted, so one such type cannot hold every other back.
 *
 * What it cannot see: deletes (a search finds no deleted resource), and versions overwritten
 * before their window is searched (the search finds the current one; a subscriber told of it is
 * told the resource changed). A change is notified twice when its CloudTrail event arrives later
 * than the lag (the event's id is another than the reconciler's), which at-least-once allows.
 */

/** Reads what a FHIR server changed (the `FhirReader`; tests: any server). */
export interface ChangeFeed {
  /**
   * The resources of `type` whose `meta.lastUpdated` is in [fromMs, toMs), as the server holds
   * them now, page by page. Throws `SearchRefusedError` when the server refuses the search in a way
   * a retry would not change, anything else when it cannot answer now.
   */
  changed(type: string, fromMs: number, toMs: number, signal: AbortSignal): AsyncIterable<readonly FoundResource[]>;
}

export interface FoundResource {
  readonly resource: Record<string, unknown>;
}

/** A search the server refuses for good (a type it does not host, a page past the size limit). */
export class SearchRefusedError extends Error {}

/** A window whose resources kept changing while it was paged: to be searched in shorter windows. */
export class WindowChangingError extends Error {}

/** What the reconciler needs of the ingest pipeline (`IngestService.acceptFound`). */
export interface FoundChangeSink {
  acceptFound(
    found: readonly FoundChange[],
    select: (items: readonly AcceptItem[]) => Promise<AcceptItem[]>,
  ): Promise<{ readonly notifications: number }>;
}

export interface ReconcileReport {
  /** The windows done, epoch ms: from the checkpoint the run started at to where it left it. */
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

/**
 * The longest window one search per type covers: after a stop longer than `everyMs`, the broker
 * catches up an hour per search rather than `everyMs` per search.
 */
export const MIN_WINDOW_CAP_MS = 3_600_000;

/** Runs a window halved down to a second may still be stopped in before it is given up as refused. */
const STOPS_AT_A_SECOND = 3;

/** Statuses that collect notifications (the matching index's). */
const COLLECTING: readonly SubscriptionStatus[] = ['requested', 'active', 'error'];

/** Found resources judged and committed together (a search page is asked for with this `_count`). */
export const PAGE = 100;

/** How long windows may be for a reconciler run every `everyMs`. */
export function windowCapMs(everyMs: number): number {
  return Math.max(everyMs, MIN_WINDOW_CAP_MS);
}

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
    this.#source = `fhir:${sha256(this.#base).slice(0, 32)}`;
    this.#everyMs = deps.everyMs;
    this.#lagMs = deps.lagMs;
    for (const outcome of ['notified', 'already_notified', 'not_matched', 'skipped']) {
      this.#metrics.inc('broker_reconcile_resources_total', { outcome }, 0);
    }
    for (const outcome of ['completed', 'stopped', 'failed']) {
      this.#metrics.inc('broker_reconcile_runs_total', { outcome }, 0);
    }
    this.#metrics.inc('broker_reconcile_searches_refused_total', {}, 0);
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
    const tally = { found: 0, notifications: 0 };
    let from: number | undefined;
    const report = () => ({
      ...(from === undefined ? {} : { from }),
      ...(this.#checkpoint === undefined ? {} : { to: this.#checkpoint }),
      ...tally,
    });
    try {
      from = await this.#store.reconcileCheckpoint(this.#source);
      if (from === undefined) {
        // Reconciliation starts here: the changes before it were the events' to notify.
        await this.#store.saveReconcileCheckpoint(this.#source, to);
        this.#checkpoint = to;
        this.#logger.info('reconciliation starts', { base: this.#base, from: new Date(to).toISOString() });
        this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'completed' });
        return { found: 0, notifications: 0 };
      }
      const global = from;
      this.#checkpoint = global;
      const types = global < to ? await this.#types() : [];
      // Each type moves on by its own checkpoint: a type stopped or failing does not hold the others.
      const starts = new Map(
        await Promise.all(
          types.map(async (type) => {
            const own = await this.#store.reconcileCheckpoint(this.#typeSource(type));
            return [type, Math.max(global, own ?? global)] as const;
          }),
        ),
      );
      const since = types.length === 0 ? global : Math.min(...starts.values());
      this.#checkpoint = since;
      const state: RunState = { since, signal, told: new Map(), versions: new Map() };
      try {
        for (const type of types) {
          if (signal.aborted) break;
          starts.set(type, await this.#reconcileType(type, starts.get(type) as number, to, state, tally));
        }
      } finally {
        // The source's checkpoint follows the type furthest behind (stopped, failed or not): what the
        // next run's told read starts from, the age reported, and where a type new to the run starts.
        const reached = types.length === 0 ? to : Math.min(...starts.values());
        if (reached > global) {
          await this.#store.saveReconcileCheckpoint(this.#source, reached).catch(() => undefined);
          this.#checkpoint = reached;
        }
      }
    } catch (err) {
      if (!signal.aborted) {
        this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'failed' });
        this.#logger.warn('reconciliation failed; the next run starts from the last window done', {
          err: err as Error,
          ...this.#checkpointField(),
        });
        return report();
      }
    }
    if (signal.aborted) {
      this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'stopped' });
      this.#logger.info('reconciliation stopped; the next run goes on from the last window done', {
        ...this.#checkpointField(),
        ...tally,
      });
      return report();
    }
    this.#metrics.inc('broker_reconcile_runs_total', { outcome: 'completed' });
    if (tally.found > 0) {
      this.#logger.info('reconciled', {
        from: new Date(from as number).toISOString(),
        ...this.#checkpointField(),
        ...tally,
      });
    }
    return report();
  }

  /** The checkpoint of one type's windows (beside the source's, which every type starts from). */
  #typeSource(type: string): string {
    return `${this.#source}:${type}`;
  }

  /** How many times the type's window starting at `start` was halved (see `#reconcileType`). */
  #halvingSource(type: string, start: number): string {
    return `${this.#source}:${type}@${start}`;
  }

  #checkpointField(): { checkpoint?: string } {
    return this.#checkpoint === undefined ? {} : { checkpoint: new Date(this.#checkpoint).toISOString() };
  }

  /**
   * One type's windows from `start` to `to`, its checkpoint saved after each. A window starting
   * where one could not be done (the run stopped in it, or it kept changing while it was paged) is
   * halved, and the halving is stored with that start (a checkpoint only ever moves forward, so a
   * key per start: `…@start` → halvings), so the next run, in whatever process, tries the shorter
   * one; the window after a halved one done starts one halving up. So a window with more changes
   * than a run can page through still gets done, in parts; one still stopped STOPS_AT_A_SECOND runs
   * after it came down to a second is given up. A search refused for good skips the type for that
   * window. Answers where the type's windows got to.
   */
  async #reconcileType(
    type: string,
    from: number,
    to: number,
    state: RunState,
    tally: { found: number; notifications: number },
  ): Promise<number> {
    const { signal } = state;
    const cap = windowCapMs(this.#everyMs);
    let start = from;
    while (start < to && !signal.aborted) {
      const halvings = (await this.#store.reconcileCheckpoint(this.#halvingSource(type, start))) ?? 0;
      // Halved from what this run could try (the cap, or less at the tail): each halving shortens it.
      const length = Math.max(1000, Math.floor(Math.min(cap, to - start) / 2 ** halvings));
      const window = { start, end: Math.min(start + length, to) };
      // Stopped STOPS_AT_A_SECOND times more once halved to a second: given up, said and counted, so
      // the type moves on.
      const toASecond = Math.max(0, Math.ceil(Math.log2(Math.min(cap, to - start) / 1000)));
      if (halvings >= toASecond + STOPS_AT_A_SECOND) {
        this.#refused(type, window, `the window was not done in ${halvings} runs, the last ones a second long`);
        await this.#store.saveReconcileCheckpoint(this.#typeSource(type), window.end);
        start = window.end;
        continue;
      }
      try {
        for await (const page of readAhead(this.#feed.changed(type, window.start, window.end, signal))) {
          const done = await this.#reconcilePage(type, page, window, state);
          tally.found += done.found;
          tally.notifications += done.notifications;
          if (signal.aborted) break;
        }
      } catch (err) {
        // Stopped in a read: as stopped between pages, below.
        if (!signal.aborted) {
          if (err instanceof WindowChangingError && window.end - window.start > 1000) {
            await this.#store.saveReconcileCheckpoint(this.#halvingSource(type, start), halvings + 1);
            continue;
          }
          if (!(err instanceof SearchRefusedError || err instanceof WindowChangingError)) throw err;
          this.#refused(type, window, err.message);
        }
      }
      if (signal.aborted) {
        // Perhaps too long to be done in one run's time: shorter next time (counted at a second
        // too, towards STOPS_AT_A_SECOND). The store may be what stopped, with the run: the next
        // run tries again either way.
        await this.#store
          .saveReconcileCheckpoint(this.#halvingSource(type, start), halvings + 1)
          .catch(() => undefined);
        return start;
      }
      if (halvings > 0) await this.#store.saveReconcileCheckpoint(this.#halvingSource(type, window.end), halvings - 1);
      await this.#store.saveReconcileCheckpoint(this.#typeSource(type), window.end);
      start = window.end;
    }
    return start;
  }

  /** A type's search refused for good: the window is skipped for it, said and counted. */
  #refused(type: string, window: Window, reason: string): void {
    this.#metrics.inc('broker_reconcile_searches_refused_total');
    this.#logger.warn('reconciliation skips a type for one window: the FHIR server refuses its search', {
      resourceType: type,
      reason,
      from: new Date(window.start).toISOString(),
      to: new Date(window.end).toISOString(),
    });
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

  /**
   * What `subscriptionId` was told of, from the run's oldest window start − VERSION_SLACK_MS on
   * (every version the run judges is from then on): read once per run (stopped with the run),
   * then kept up to date with what the run itself notifies. `Type/id` → the latest change time.
   */
  #told(state: RunState, subscriptionId: string): Promise<Map<string, number>> {
    let told = state.told.get(subscriptionId);
    if (told === undefined) {
      told = this.#store.notifiedResources(subscriptionId, state.since - VERSION_SLACK_MS, state.signal);
      state.told.set(subscriptionId, told);
    }
    return told;
  }

  async #reconcilePage(
    type: string,
    page: readonly FoundResource[],
    window: Window,
    state: RunState,
  ): Promise<{ found: number; notifications: number }> {
    const found: FoundChange[] = [];
    for (const { resource } of page) {
      const change = this.#changeOf(type, resource, window);
      if (change === undefined) this.#metrics.inc('broker_reconcile_resources_total', { outcome: 'skipped' });
      else found.push(change);
    }
    let notifications = 0;
    for (let i = 0; i < found.length; i += PAGE) {
      const chunk = found.slice(i, i + PAGE);
      let matched = 0;
      let selected = 0;
      const done = await this.#sink.acceptFound(chunk, async (items) => {
        const kept = await this.#untold(items, state);
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
  #changeOf(type: string, resource: Record<string, unknown>, window: Window): FoundChange | undefined {
    const id = resource.id;
    const meta = resource.meta as { versionId?: unknown; lastUpdated?: unknown } | undefined;
    const at = typeof meta?.lastUpdated === 'string' ? Date.parse(meta.lastUpdated) : Number.NaN;
    if (resource.resourceType !== type || typeof id !== 'string' || !/^[A-Za-z0-9\-.]{1,64}$/.test(id)) {
      return undefined;
    }
    // A server may read `_lastUpdated` bounds to the second (HealthLake: "the boundary precision is
    // the server's"): what it returns from the seconds a window's edges fall in is taken, so a
    // change in the last part-second of a window, left out by its `lt`, is found by the next one's
    // `ge`. Found twice, it is notified once.
    if (!(at >= Math.floor(window.start / 1000) * 1000 && at < Math.ceil(window.end / 1000) * 1000)) return undefined;
    const version = typeof meta?.versionId === 'string' && meta.versionId.length <= 64 ? meta.versionId : undefined;
    // Counted versions (HealthLake, HAPI): 1 is the create. An opaque one (a UUID) says nothing:
    // such a change goes only to subscriptions that take both creates and updates.
    const counted = version !== undefined && /^[1-9][0-9]{0,15}$/.test(version);
    const interaction: Interaction = counted && version === '1' ? 'create' : 'update';
    const change: ResourceChange = {
      // The same version found twice (a window done again after a crash) is one event. Hashed: the
      // event id reaches logs, the resource id must not.
      eventId: `reconcile:${this.#source}:${sha256(`${type}/${id}/${version ?? `@${at}`}`).slice(0, 40)}`,
      resourceType: type,
      resourceId: id,
      interaction,
      datastoreId: this.#datastoreId,
      fhirBase: this.#base,
      time: new Date(at).toISOString(),
    };
    return {
      change,
      read: { resource, base: this.#base },
      ...(counted ? {} : { alsoAs: 'create' as const }),
    };
  }

  /**
   * Of each matched item, the subscriptions to notify: those that existed and collected
   * notifications when the change happened, and hold no notification about the resource from then
   * on. What is kept is noted as told, so a resource found twice in a run is notified once.
   */
  async #untold(items: readonly AcceptItem[], state: RunState): Promise<AcceptItem[]> {
    const ids = [...new Set(items.flatMap((i) => i.subscriptionIds))];
    const records = new Map<string, SubscriptionRecord>();
    for (const rec of await Promise.all(ids.map((id) => this.#store.getSubscription(id)))) {
      if (rec !== undefined) records.set(rec.id, rec);
    }
    const kept: AcceptItem[] = [];
    for (const item of items) {
      const at = Date.parse(item.change.time);
      const key = `${item.change.resourceType}/${item.change.resourceId}`;
      const keep: string[] = [];
      for (const id of item.subscriptionIds) {
        const rec = records.get(id);
        if (rec === undefined || !(await this.#collectedAt(rec, at, state))) continue;
        const told = await this.#told(state, id);
        if ((told.get(key) ?? Number.NEGATIVE_INFINITY) >= at - VERSION_SLACK_MS) continue;
        told.set(key, at);
        keep.push(id);
      }
      if (keep.length > 0) kept.push({ ...item, subscriptionIds: keep });
    }
    return kept;
  }

  /**
   * Whether the subscription existed and collected notifications at `at`: created by then, and in a
   * collecting status in the version in effect then (the store's last earlier versions, read once
   * per run; where they do not reach back that far, the oldest version known).
   */
  async #collectedAt(rec: SubscriptionRecord, at: number, state: RunState): Promise<boolean> {
    if (Date.parse(rec.createdAt) > at) return false;
    if (Date.parse(rec.updatedAt) <= at) return COLLECTING.includes(rec.status);
    // Read again when the subscription was written since (a handshake, a PUT during the run).
    const key = `${rec.id}@${rec.updatedAt}`;
    let versions = state.versions.get(key);
    if (versions === undefined) {
      versions = this.#store.subscriptionVersions(rec.id);
      state.versions.set(key, versions);
    }
    const earlier = await versions;
    const then = earlier.find((v) => Date.parse(v.updatedAt) <= at) ?? earlier.at(-1);
    return COLLECTING.includes(then?.status ?? rec.status);
  }
}

/** What one run reads once and shares across its windows. */
interface RunState {
  /** The oldest window start of the run. */
  readonly since: number;
  readonly signal: AbortSignal;
  readonly told: Map<string, Promise<Map<string, number>>>;
  readonly versions: Map<string, Promise<SubscriptionVersion[]>>;
}

interface Window {
  readonly start: number;
  readonly end: number;
}

function sha256(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

/**
 * The pages of `pages`, each next one asked for as soon as the one before is handed out: the
 * search round trip runs while the page before is matched and committed. A failure of the page
 * read ahead surfaces when it is reached; leaving early lets the source go.
 */
async function* readAhead<T>(pages: AsyncIterable<T>): AsyncGenerator<T> {
  const source = pages[Symbol.asyncIterator]();
  let next = source.next();
  try {
    for (;;) {
      const page = await next;
      if (page.done === true) return;
      next = source.next();
      // Not yet awaited: a rejection waits for its turn rather than going unhandled.
      next.catch(() => undefined);
      yield page.value;
    }
  } finally {
    // An async generator runs one step at a time: a `return` queues behind the read in flight, and
    // answers that read's failure, which nobody is left to take.
    await source.return?.().catch(() => undefined);
  }
}

/** For config checks: how long delivered notifications must be kept for reconciliation to see them. */
export function reconcileRetentionFloorMs(everyMs: number, lagMs: number): number {
  return lagMs + windowCapMs(everyMs) + VERSION_SLACK_MS + NOTIFIED_SCAN_SLACK_MS;
}
