import { BrokerError } from '../core/errors.js';
import { BROKER_EXT } from '../core/fhir-urls.js';
import { type LifecycleSink, noLifecycleSink } from '../core/lifecycle.js';
import { MatchIndex } from '../core/match-index.js';
import type { SearchParameterCatalog } from '../core/search-filter.js';
import { Slots } from '../core/slots.js';
import { applyStatusEvent, clientStatusChange, type StatusEvent } from '../core/status.js';
import {
  hasReason,
  mayHaveFullResources,
  parseSubscription,
  requireReason,
  type SubscriptionSpec,
  withoutEmpty,
} from '../core/subscription.js';
import type { TopicCatalog } from '../core/topics.js';
import type {
  Clock,
  FhirResource,
  IdSource,
  Notification,
  ResourceChange,
  SubscriptionRecord,
  SubscriptionStatus,
} from '../core/types.js';
import type { EndpointGuard } from '../delivery/endpoint-guard.js';
import { generateWebhookSecret } from '../delivery/webhook-signature.js';
import type { Logger } from '../observability/logger.js';
import { nextVersionAt, type Store } from '../store/store.js';

/**
 * The subscription registry: the one way subscriptions change. Each change is written to the
 * store first, then to the in-memory cache and matching index, so they never run ahead of what
 * is durable. Owners see only their own subscriptions; another owner's id is "not found".
 */

export interface RegistryListener {
  /** A subscription now wants a handshake (created or re-activated). */
  onRequested(id: string): void;
  /** A subscription became active: pending notifications may flow. */
  onActivated(id: string): void;
  /** The client deleted the subscription; `before` is what it was. */
  onRemoved(id: string, before: SubscriptionRecord): void;
  /** Anything else about the subscription changed (status, channel, heartbeat period); `before` is what it was. */
  onChanged(id: string, before: SubscriptionRecord): void;
  /**
   * Before dead letters are re-queued: stop delivering the subscription, and make every delivery
   * state known so far durable.
   */
  beforeRequeue(id: string): Promise<void>;
  /**
   * Dead letters were re-queued (or the re-activation failed after `beforeRequeue`): whatever is
   * held in memory for the subscription is stale; delivery may go on.
   */
  onRequeued(id: string): void;
}

/** Attempts of a client update that raced with a broker status change before answering 409. */
const UPDATE_ATTEMPTS = 3;
/** One client's endpoint checks (DNS lookups) at once; see `#vet`. */
const VETTING_PER_CLIENT = 4;

/** 24 h: how long a rotated-out webhook secret keeps signing, so receivers can switch without a gap. */
export const SECRET_OVERLAP_MS = 24 * 60 * 60 * 1000;

export interface WriteResult {
  readonly record: SubscriptionRecord;
  /**
   * The secret to show: the one the broker generated for a rest-hook, in the answer to its create,
   * or the one a subscription made a rest-hook by an update signs with, in that answer.
   */
  readonly shownSecret?: string;
  /** A conditional create (`If-None-Exist`) found this subscription: nothing was created. */
  readonly existing?: true;
}

/** Only a rest-hook's requests are signed: another channel's secret is kept, unused and unshown. */
const signs = (channel: { readonly type: string }): boolean => channel.type === 'rest-hook';

export class SubscriptionRegistry {
  readonly #store: Store;
  readonly #topics: TopicCatalog;
  readonly #search: SearchParameterCatalog | undefined;
  readonly #guard: EndpointGuard;
  readonly #clock: Clock;
  /** Per client: the create under way, which the next one waits for. */
  readonly #creating = new Map<string, Promise<void>>();
  /** Per client: its endpoint checks under way (see `#vet`). */
  readonly #vetting = new Map<string, Slots>();
  readonly #ids: IdSource;
  readonly #logger: Logger;
  readonly #index = new MatchIndex();
  readonly #cache = new Map<string, SubscriptionRecord>();
  /** How many of the cached subscriptions are in each status (kept by `#remember` and `#forget`). */
  readonly #byStatus: Record<SubscriptionStatus, number> = { requested: 0, active: 0, error: 0, off: 0 };
  readonly #lifecycle: LifecycleSink;
  #listener: RegistryListener | undefined;

  readonly #maxPerClient: number;
  readonly #fullResourceClients: readonly string[] | '*';

  constructor(deps: {
    lifecycle?: LifecycleSink;
    maxSubscriptionsPerClient?: number;
    store: Store;
    topics: TopicCatalog;
    /** Search parameters for content filters; absent: such filters are refused. */
    search?: SearchParameterCatalog;
    /** `BROKER_FULL_RESOURCE_CLIENTS`: who may ask for `full-resource` content (default: no one). */
    fullResourceClients?: readonly string[] | '*';
    guard: EndpointGuard;
    clock: Clock;
    ids: IdSource;
    logger: Logger;
  }) {
    this.#store = deps.store;
    this.#topics = deps.topics;
    this.#search = deps.search;
    this.#guard = deps.guard;
    this.#clock = deps.clock;
    this.#ids = deps.ids;
    this.#logger = deps.logger;
    this.#lifecycle = deps.lifecycle ?? noLifecycleSink;
    this.#maxPerClient = deps.maxSubscriptionsPerClient ?? Number.POSITIVE_INFINITY;
    this.#fullResourceClients = deps.fullResourceClients ?? [];
  }

  listen(listener: RegistryListener): void {
    this.#listener = listener;
  }

  async load(): Promise<void> {
    for (const rec of await this.#store.listSubscriptions()) this.#remember(rec);
    this.#logger.info('subscriptions loaded', { count: this.#cache.size });
  }

  /** Replace the cache and index with what the store holds now. */
  async reload(): Promise<void> {
    const fresh = await this.#store.listSubscriptions();
    const ids = new Set(fresh.map((r) => r.id));
    for (const id of [...this.#cache.keys()]) {
      if (ids.has(id)) continue;
      this.#forget(id);
    }
    for (const rec of fresh) this.#remember(rec);
  }

  /**
   * Re-read these subscriptions from the store into the cache (and index): another instance may
   * have created, changed or deleted them. For a store matched through its type index (AWS),
   * where the cache is not reloaded as a whole before each batch of events.
   */
  async refresh(ids: Iterable<string>): Promise<void> {
    await Promise.all(
      [...new Set(ids)].map(async (id) => {
        const rec = await this.#store.getSubscription(id);
        if (rec === undefined) {
          this.#forget(id);
          return;
        }
        // A change this instance made while the read was on its way is newer than what it read.
        const cached = this.#cache.get(id);
        if (cached === undefined || Date.parse(cached.updatedAt) <= Date.parse(rec.updatedAt)) this.#remember(rec);
      }),
    );
  }

  get(id: string): SubscriptionRecord | undefined {
    return this.#cache.get(id);
  }

  /** `rec` is still the subscription as this registry holds it: not deleted, not changed since it was read. */
  isCurrent(rec: SubscriptionRecord): boolean {
    return this.#cache.get(rec.id)?.updatedAt === rec.updatedAt;
  }

  all(): IterableIterator<SubscriptionRecord> {
    return this.#cache.values();
  }

  /**
   * The rest-hook subscriptions that send (requested, active) to an endpoint the address policy
   * refuses now, each with the reason: registered under another allow-list (a restart without
   * it), or a name that now resolves to a private address. Their next attempt will fail.
   */
  async refusedEndpoints(): Promise<{ id: string; owner: string; reason: string }[]> {
    const sending = [...this.#cache.values()].filter(
      (sub) =>
        sub.channel.type === 'rest-hook' &&
        sub.channel.endpoint !== undefined &&
        (sub.status === 'requested' || sub.status === 'active'),
    );
    const reasons = await Promise.all(
      sending.map((sub) =>
        this.#guard.checkEndpoint(sub.channel.endpoint as string).then(
          () => undefined,
          (err: unknown) => (err as Error).message,
        ),
      ),
    );
    return sending.flatMap((sub, i) => {
      const reason = reasons[i];
      return reason === undefined ? [] : [{ id: sub.id, owner: sub.owner, reason }];
    });
  }

  get size(): number {
    return this.#index.size;
  }

  /** The cached subscriptions (every client's) by status, every status present. */
  countsByStatus(): Readonly<Record<SubscriptionStatus, number>> {
    return { ...this.#byStatus };
  }

  match(change: ResourceChange, nowMs: number): string[] {
    return this.#index.match(change, nowMs);
  }

  /** Keep the cached event counters in step after notifications were committed. */
  noteNotifications(notifications: readonly Notification[]): void {
    for (const n of notifications) {
      const rec = this.#cache.get(n.subscriptionId);
      if (rec !== undefined && n.eventNumber > rec.eventsSinceStart) {
        this.#cache.set(rec.id, { ...rec, eventsSinceStart: n.eventNumber });
      }
    }
  }

  /**
   * `unlessExists` (a conditional create): the condition, tried on the client's subscriptions in
   * turn with the client's other creates, so two of them racing in this process create one. One
   * match: nothing is created and it is the answer; more than one: a 412.
   */
  async create(
    owner: string,
    body: unknown,
    unlessExists?: (sub: SubscriptionRecord) => boolean,
  ): Promise<WriteResult> {
    const spec = this.#withContent(owner, parseSubscription(body, this.#topics, this.#search));
    requireReason(spec.resource);
    this.#checkEnd(spec);
    if (spec.askedStatus === 'error') {
      throw new BrokerError('INVALID_STATUS_CHANGE', 'Only the broker sets status error', {
        expression: 'Subscription.status',
      });
    }
    // Vetted (a DNS lookup) before queueing: a slow lookup holds up no other create.
    if (spec.channel.endpoint !== undefined) await this.#vet(owner, spec.channel.endpoint);
    return this.#oneAtATime(owner, async () => {
      if (unlessExists !== undefined) {
        const found = (await this.#store.listSubscriptions(owner)).filter(unlessExists);
        if (found.length > 1) {
          throw new BrokerError(
            'PRECONDITION_FAILED',
            `If-None-Exist matches ${found.length} subscriptions; a conditional create needs at most one`,
          );
        }
        // Read again by id (consistently, on DynamoDB, whose owner index may lag): the match as it
        // is now, if it still is one.
        const match = found[0] === undefined ? undefined : await this.#store.getSubscription(found[0].id);
        if (match !== undefined && match.owner === owner && unlessExists(match)) {
          return { record: match, existing: true };
        }
      }
      return this.#insert(owner, spec);
    });
  }

  /**
   * The guard's check of a client's endpoint, at most VETTING_PER_CLIENT of one client's at once
   * (the rest wait their turn): a client registering many names whose DNS does not answer holds a
   * few of the resolver's slots (dns-resolver.ts, MAX_IN_FLIGHT), never all of them.
   */
  async #vet(owner: string, endpoint: string): Promise<void> {
    let slots = this.#vetting.get(owner);
    if (slots === undefined) {
      slots = new Slots(VETTING_PER_CLIENT);
      this.#vetting.set(owner, slots);
    }
    const mine = slots;
    try {
      await mine.run(() => this.#guard.checkEndpoint(endpoint));
    } finally {
      if (mine.idle) this.#vetting.delete(owner);
    }
  }

  /**
   * One create at a time per client in this process: the store checks the quota atomically with
   * each insert (on any number of instances), and creates of one client queued here do not race
   * each other for its count (on DynamoDB a lost race is a retry).
   */
  async #oneAtATime<T>(owner: string, fn: () => Promise<T>): Promise<T> {
    const before = this.#creating.get(owner) ?? Promise.resolve();
    let done = (): void => undefined;
    const mine = before.then(() => new Promise<void>((resolve) => (done = resolve)));
    this.#creating.set(owner, mine);
    await before;
    try {
      return await fn();
    } finally {
      done();
      if (this.#creating.get(owner) === mine) this.#creating.delete(owner);
    }
  }

  async #insert(owner: string, spec: SubscriptionSpec): Promise<WriteResult> {
    const now = new Date(this.#clock.now()).toISOString();
    const generatedSecret = spec.webhookSecret === undefined ? generateWebhookSecret() : undefined;
    const record: SubscriptionRecord = {
      id: this.#ids.uuid(),
      owner,
      kind: spec.kind,
      topic: spec.topic,
      status: spec.askedStatus === 'off' ? 'off' : 'requested',
      match: spec.match,
      channel: spec.channel,
      webhookSecret: spec.webhookSecret ?? (generatedSecret as string),
      ...(spec.end === undefined ? {} : { end: spec.end }),
      eventsSinceStart: 0,
      createdAt: now,
      updatedAt: now,
      resource: spec.resource,
    };
    // The quota is counted by the store, atomically with the insert: on AWS other instances create too.
    if (!(await this.#store.insertSubscription(record, this.#maxPerClient))) {
      throw new BrokerError(
        'QUOTA_EXCEEDED',
        `Client ${owner} already has ${this.#maxPerClient} subscriptions, its limit (BROKER_MAX_SUBSCRIPTIONS_PER_CLIENT)`,
      );
    }
    this.#remember(record);
    this.#logger.info('subscription created', {
      subscription: record.id,
      owner,
      kind: record.kind,
      // Classic criteria may hold patient data (`Patient?name:exact=…`): their resource type only.
      topic: record.kind === 'classic' ? record.topic.replace(/\?.*$/s, '?…') : record.topic,
    });
    if (record.status === 'requested') this.#listener?.onRequested(record.id);
    return {
      record,
      ...(generatedSecret === undefined || !signs(spec.channel) ? {} : { shownSecret: generatedSecret }),
    };
  }

  /** The owner's subscription, fresh from the store (counters included), or NOT_FOUND. */
  async read(owner: string, id: string): Promise<SubscriptionRecord> {
    const rec = await this.#store.getSubscription(id);
    if (rec === undefined || rec.owner !== owner) throw new BrokerError('NOT_FOUND', `Subscription/${id} not found`);
    return rec;
  }

  /**
   * The owner's subscription as it is, then the earlier versions the store keeps, newest first,
   * each as the record it was (status, error, resource and version; the rest as now), or NOT_FOUND.
   */
  async history(owner: string, id: string): Promise<SubscriptionRecord[]> {
    const current = await this.read(owner, id);
    return [current, ...(await this.#earlier(current))];
  }

  /**
   * The owner's subscription as it was at version `vid` (`versionId`): the current one without a
   * second read, else an earlier one the store keeps; undefined when it keeps no such version.
   * NOT_FOUND when the subscription is not the owner's.
   */
  async version(owner: string, id: string, vid: string): Promise<SubscriptionRecord | undefined> {
    const current = await this.read(owner, id);
    if (versionId(current) === vid) return current;
    return (await this.#earlier(current)).find((v) => versionId(v) === vid);
  }

  /**
   * `$expunge` of previous versions: the owner's subscription keeps only its current version (a
   * header value or endpoint it retired is then readable nowhere). How many versions went; NOT_FOUND
   * when the subscription is not the owner's.
   */
  async expungeVersions(owner: string, id: string): Promise<number> {
    await this.read(owner, id);
    const count = await this.#store.forgetSubscriptionVersions(id);
    this.#logger.info('subscription versions expunged', { subscription: id, owner, count });
    return count;
  }

  /** The earlier versions the store keeps of `current`, newest first, each as the record it was. */
  async #earlier(current: SubscriptionRecord): Promise<SubscriptionRecord[]> {
    const { error: _error, ...rest } = current;
    return (
      (await this.#store.subscriptionVersions(current.id))
        // A version written between the two reads is the current one's successor, not its past.
        .filter((v) => Date.parse(v.updatedAt) < Date.parse(current.updatedAt))
        .map((v) => ({ ...rest, ...v }))
    );
  }

  async search(owner: string): Promise<SubscriptionRecord[]> {
    return this.#store.listSubscriptions(owner);
  }

  /** `ifMatch`: the versions the client read (`ETag` / `meta.versionId`); another one now is a 412. */
  async update(owner: string, id: string, body: unknown, ifMatch?: readonly string[]): Promise<WriteResult> {
    checkBodyId(body, id);
    const spec = this.#withContent(owner, parseSubscription(body, this.#topics, this.#search));
    this.#checkEnd(spec);
    let checkedEndpoint: string | undefined;
    for (let attempt = 1; ; attempt++) {
      const current = await this.read(owner, id);
      checkVersion(current, ifMatch);
      if (hasReason(current.resource)) requireReason(spec.resource);
      const channelChanged =
        JSON.stringify(spec.channel) !== JSON.stringify(current.channel) || spec.topic !== current.topic;
      const endpoint = spec.channel.endpoint;
      if (endpoint !== undefined && endpoint !== current.channel.endpoint && endpoint !== checkedEndpoint) {
        await this.#vet(owner, endpoint);
        checkedEndpoint = endpoint;
      }
      const status = clientStatusChange(
        current.status,
        spec.askedStatus,
        channelChanged,
        endpoint !== current.channel.endpoint,
      );
      // Left in `error` (the client echoed it), the subscription keeps the broker's reason; in any
      // other status a previous one is cleared.
      const { error: previousError, end: _previousEnd, ...base } = current;
      const error = status === 'error' ? previousError : undefined;
      // A subscription made a rest-hook (from websocket) without a secret of its own keeps the one it
      // has, which signs from now on: shown in this answer, since a websocket one's was not at its
      // create (and one the client was shown or chose is the same secret, not a replacement).
      const show =
        signs(spec.channel) && !signs(current.channel) && spec.webhookSecret === undefined
          ? current.webhookSecret
          : undefined;
      const next: SubscriptionRecord = {
        ...base,
        kind: spec.kind,
        topic: spec.topic,
        status,
        ...(error === undefined ? {} : { error }),
        match: spec.match,
        channel: spec.channel,
        webhookSecret: spec.webhookSecret ?? current.webhookSecret,
        ...this.#rotation(current, spec.webhookSecret),
        ...(spec.end === undefined ? {} : { end: spec.end }),
        updatedAt: this.#nextUpdatedAt(current),
        resource: spec.resource,
      };
      const reactivating = status === 'requested' && current.status !== 'requested';
      let stored: SubscriptionRecord | undefined;
      const requeuedAt = this.#clock.now();
      try {
        let written = next;
        if (reactivating) {
          // Re-activation: what was dead-lettered goes back in the queue, delivered after the handshake.
          await this.#listener?.beforeRequeue(id);
          const requeued = await this.#store.requeueDeadLetters(id, requeuedAt);
          if (requeued > 0) this.#logger.info('dead letters requeued', { subscription: id, count: requeued });
          // The handshake's schedule counts from `updatedAt`: taken once the re-queue is done, so a
          // long one (many dead letters on DynamoDB) does not use up its retries before it starts.
          written = { ...next, updatedAt: this.#nextUpdatedAt(current) };
        }
        // Compare-and-set: a broker status change (dead letter, 410) made meanwhile is never overwritten.
        stored = await this.#store.replaceSubscription(written, {
          status: current.status,
          updatedAt: current.updatedAt,
        });
      } finally {
        // Also when the change was not written (the re-queue may have been): the lane reads again,
        // in every instance once the store lets lanes go on (a failure to say so: its fence runs out).
        if (reactivating) {
          await this.#store.requeueSettled?.(id, requeuedAt).catch((err: unknown) =>
            this.#logger.error('re-queue not settled; its lanes wait for the fence to run out', {
              subscription: id,
              err: err as Error,
            }),
          );
          this.#listener?.onRequeued(id);
        }
      }
      if (stored === undefined) {
        if (attempt < UPDATE_ATTEMPTS) continue;
        throw new BrokerError('CONFLICT', `Subscription/${id} kept changing while it was being updated; try again`);
      }
      const record = this.#afterUpdate(owner, current, stored);
      return { record, ...(show === undefined ? {} : { shownSecret: show }) };
    }
  }

  /**
   * `full-resource` content only for the clients `BROKER_FULL_RESOURCE_CLIENTS` names (their
   * endpoints receive the resources, PHI, as the broker reads them), and only where the broker
   * reads resources (`BROKER_FHIR_READ`). A write that turns such a subscription off is taken
   * whoever asks: a client taken off the list can still stop what it has. The spec then carries
   * the owner, so the content stage reads for it and checks the list again at each event.
   */
  #withContent(owner: string, spec: SubscriptionSpec): SubscriptionSpec {
    if (spec.channel.content !== 'full-resource') return spec;
    if (spec.askedStatus !== 'off') {
      // A classic Subscription asks for it with channel.payload (R4: the resource goes to the endpoint).
      const classic = spec.kind === 'classic';
      const what = classic
        ? 'A classic Subscription with channel.payload (the resource itself sent to the endpoint)'
        : 'full-resource content';
      const instead = classic ? 'omit payload (an empty POST per change)' : 'use id-only';
      const expression = classic ? 'Subscription.channel.payload' : 'Subscription.channel._payload';
      if (this.#search === undefined) {
        throw new BrokerError(
          'UNSUPPORTED_CONTENT',
          `${what} needs the broker to read resources from the FHIR server, and it is not set up to (BROKER_FHIR_READ); ${instead}`,
          { expression },
        );
      }
      if (!mayHaveFullResources(this.#fullResourceClients, owner)) {
        throw new BrokerError(
          'UNSUPPORTED_CONTENT',
          `${what} is not enabled for client ${owner}: its endpoint would receive the resources themselves, which the operator allows per client (BROKER_FULL_RESOURCE_CLIENTS); ${instead}`,
          { expression },
        );
      }
    }
    return { ...spec, match: { ...spec.match, fullResource: { owner } } };
  }

  /** An `end` already past would be off at once: refused, unless the client is turning it off anyway. */
  #checkEnd(spec: SubscriptionSpec): void {
    if (spec.end === undefined || spec.askedStatus === 'off') return;
    if (Date.parse(spec.end) > this.#clock.now()) return;
    throw new BrokerError(
      'INVALID_RESOURCE',
      `Subscription.end ${spec.end} has passed: the subscription would be off at once`,
      {
        expression: 'Subscription.end',
      },
    );
  }

  #afterUpdate(owner: string, current: SubscriptionRecord, stored: SubscriptionRecord): SubscriptionRecord {
    const { id, status } = stored;
    this.#remember(stored);
    this.#logger.info('subscription updated', { subscription: id, owner, status });
    if (status !== current.status) {
      this.#lifecycle.publish({
        type: 'Subscription Status Changed',
        subscriptionId: id,
        owner,
        from: current.status,
        to: status,
        reason: 'changed by the client',
        time: stored.updatedAt,
      });
    }
    if (status === 'requested') this.#listener?.onRequested(id);
    this.#listener?.onChanged(id, current);
    return stored;
  }

  /**
   * With `ifMatch`, compare-and-delete: the store deletes only while the subscription is still the
   * version read here, so a change landing in between (a PUT, the broker's handshake) is a 412,
   * not deleted with it.
   */
  async delete(owner: string, id: string, ifMatch?: readonly string[]): Promise<void> {
    const before = await this.read(owner, id);
    checkVersion(before, ifMatch);
    const deleted = await this.#store.deleteSubscription(id, ifMatch === undefined ? undefined : before.updatedAt);
    if (!deleted) {
      // Changed meanwhile: a 412 naming its version now. Gone meanwhile (another DELETE): deleted.
      const now = await this.#store.getSubscription(id);
      if (now !== undefined) {
        checkVersion(now, ifMatch);
        throw new BrokerError('CONFLICT', `Subscription/${id} changed while it was being deleted; try again`);
      }
    }
    this.#forget(id);
    this.#listener?.onRemoved(id, before);
    this.#logger.info('subscription deleted', { subscription: id, owner });
  }

  /**
   * A broker-driven status change (handshake, failures, 410). Returns the new record if it applied.
   * With `basis` (the record the outcome is about: the endpoint a handshake or a 410 came from), it
   * applies only while the subscription is still that record, in the cache and in the store: an
   * answer from an endpoint the client has since left decides nothing.
   */
  async transition(
    id: string,
    event: StatusEvent,
    basis?: SubscriptionRecord,
  ): Promise<SubscriptionRecord | undefined> {
    const current = this.#cache.get(id);
    if (current === undefined) return undefined;
    if (basis !== undefined && !this.isCurrent(basis)) return undefined;
    const change = applyStatusEvent(current.status, event);
    if (change === undefined) return undefined;
    const updated = await this.#store.updateStatus(
      id,
      {
        ...change,
        expected: [current.status],
        ...(basis === undefined ? {} : { unchangedSince: basis.updatedAt }),
      },
      this.#nextUpdatedAt(current),
    );
    if (updated === undefined) return undefined;
    this.#remember(updated);
    this.#logger.info('subscription status changed', {
      subscription: id,
      from: current.status,
      to: updated.status,
      ...(change.error === undefined ? {} : { reason: change.error }),
    });
    this.#lifecycle.publish({
      type: 'Subscription Status Changed',
      subscriptionId: id,
      owner: updated.owner,
      from: current.status,
      to: updated.status,
      ...(change.error === undefined ? {} : { reason: change.error }),
      time: updated.updatedAt,
    });
    if (updated.status === 'active') this.#listener?.onActivated(id);
    this.#listener?.onChanged(id, current);
    return updated;
  }

  /** `updatedAt` for a write over `current`: now, but always after `current.updatedAt` (nextVersionAt). */
  #nextUpdatedAt(current: SubscriptionRecord): string {
    return nextVersionAt(new Date(this.#clock.now()).toISOString(), current.updatedAt);
  }

  /** The secrets that sign for this subscription now: the current one, and a rotated-out one for 24 h. */
  signingSecrets(rec: SubscriptionRecord): string[] {
    const previous = rec.previousSecret;
    return previous !== undefined && Date.parse(previous.until) > this.#clock.now()
      ? [rec.webhookSecret, previous.secret]
      : [rec.webhookSecret];
  }

  #rotation(current: SubscriptionRecord, next: string | undefined): Pick<SubscriptionRecord, 'previousSecret'> {
    if (next === undefined || next === current.webhookSecret) {
      return current.previousSecret === undefined ? {} : { previousSecret: current.previousSecret };
    }
    const until = new Date(this.#clock.now() + SECRET_OVERLAP_MS).toISOString();
    return { previousSecret: { secret: current.webhookSecret, until } };
  }

  /** The FHIR Subscription a client sees: its resource plus id, meta, status and error. */
  render(rec: SubscriptionRecord, options: { secret?: string | undefined } = {}): FhirResource {
    // Stored by a broker that kept empty values: served without them, as R4 JSON is.
    const resource = (withoutEmpty(rec.resource) ?? rec.resource) as FhirResource & {
      channel: Record<string, unknown>;
      meta?: Record<string, unknown>;
    };
    const channel: Record<string, unknown> = { ...resource.channel };
    if (options.secret !== undefined) {
      const ext = Array.isArray(channel.extension) ? channel.extension : [];
      channel.extension = [...ext, { url: BROKER_EXT.webhookSecret, valueString: options.secret }];
    }
    return {
      ...resource,
      id: rec.id,
      meta: { ...(resource.meta ?? {}), versionId: versionId(rec), lastUpdated: rec.updatedAt },
      status: rec.status,
      ...(rec.error === undefined ? {} : { error: rec.error }),
      channel,
    };
  }

  #forget(id: string): void {
    const before = this.#cache.get(id);
    if (before !== undefined) this.#byStatus[before.status]--;
    this.#cache.delete(id);
    this.#index.remove(id);
  }

  #remember(rec: SubscriptionRecord): void {
    const before = this.#cache.get(rec.id);
    if (before !== undefined) this.#byStatus[before.status]--;
    this.#byStatus[rec.status]++;
    this.#cache.set(rec.id, rec);
    this.#index.upsert(rec);
  }
}

/**
 * A subscription's version: its `updatedAt` in epoch milliseconds, which every change (the
 * client's or the broker's) moves forward by at least 1 ms.
 */
export function versionId(rec: Pick<SubscriptionRecord, 'updatedAt'>): string {
  return String(Date.parse(rec.updatedAt));
}

/**
 * FHIR update (R4 http.html#update): the body SHALL carry an id, the one in the URL. A body that is
 * not an object is left to `parseSubscription`, which says what it is instead.
 */
function checkBodyId(body: unknown, id: string): void {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return;
  const bodyId = (body as { id?: unknown }).id;
  if (bodyId === undefined) {
    throw new BrokerError('ID_MISMATCH', `The body has no id: a PUT to Subscription/${id} must carry "id": "${id}"`, {
      expression: 'Subscription.id',
    });
  }
  if (bodyId !== id) {
    throw new BrokerError('ID_MISMATCH', `Resource id ${String(bodyId)} does not match Subscription/${id}`, {
      expression: 'Subscription.id',
    });
  }
}

function checkVersion(current: SubscriptionRecord, ifMatch: readonly string[] | undefined): void {
  if (ifMatch === undefined || ifMatch.includes(versionId(current))) return;
  throw new BrokerError(
    'PRECONDITION_FAILED',
    `Subscription/${current.id} is at version ${versionId(current)}, not ${ifMatch.join(', ').slice(0, 64)}: read it again`,
  );
}
