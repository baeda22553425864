import type { ContentFilter } from './search-filter.js';
/** The domain vocabulary. Pure data: no I/O, no SDK types. */

export type Interaction = 'create' | 'update' | 'delete';
export const INTERACTIONS: readonly Interaction[] = ['create', 'update', 'delete'];

/** One write to the FHIR server, as far as the CloudTrail event tells it. */
export interface ResourceChange {
  /**
   * The deduplication key: the EventBridge event `id`, as ARCHITECTURE.md has it (EventBridge
   * redelivers under the same `id`). Not the CloudTrail `detail.eventID`: an event that differs
   * from another only in its `id` is another event to every sender that follows the contract
   * (tests and replay tools that copy a sample event and give it a new id), and keying on the
   * eventID dropped them as duplicates. A call CloudTrail itself recorded twice, which reaches
   * EventBridge under two ids, is notified twice: at least once, as webhooks are.
   */
  readonly eventId: string;
  readonly resourceType: string;
  /** Absent on older events that carry no `additionalEventData.resourceId`. */
  readonly resourceId?: string;
  readonly interaction: Interaction;
  readonly datastoreId: string;
  /** Base URL of the FHIR server that holds the resource (used for focus references). */
  readonly fhirBase: string;
  /** When the write happened (ISO 8601). */
  readonly time: string;
  /**
   * The changed resource's JSON as the broker read it from the FHIR server, on the notifications
   * of `full-resource` subscriptions only (src/service/content-stage.ts); never on a delete.
   */
  readonly resource?: string;
  /**
   * Set on a create or update whose resource, when the broker read it for full-resource
   * subscribers, the server had deleted since (`resource` is then its last version, from history):
   * a classic Subscription replicating the server sends a `DELETE`, not that version.
   */
  readonly resourceGone?: true;
}

export type SubscriptionStatus = 'requested' | 'active' | 'error' | 'off';
export type ChannelType = 'rest-hook' | 'websocket';
export type PayloadContent = 'empty' | 'id-only' | 'full-resource';

/**
 * What a subscription matches, reduced to what a CloudTrail event carries.
 * `resourceTypes` `'*'` means every type; `ids`, when present, restricts to those resource ids.
 */
export interface MatchSpec {
  readonly resourceTypes: readonly string[] | '*';
  readonly interactions: readonly Interaction[];
  readonly ids?: readonly string[];
  /**
   * Stage two: filters on the resource's content (search parameters), decided on the resource as
   * the FHIR server holds it (src/service/content-stage.ts). Only with a single resource type.
   */
  readonly content?: readonly ContentFilter[];
  /**
   * A `full-resource` subscription: stage two reads the changed resource (as for content filters)
   * and its notifications carry it, while `owner` is one of `BROKER_FULL_RESOURCE_CLIENTS`.
   */
  readonly fullResource?: { readonly owner: string };
}

export interface Channel {
  readonly type: ChannelType;
  readonly endpoint?: string;
  /** MIME type of the payload (`channel.payload`); absent for classic subscriptions without payload. */
  readonly payload?: string;
  readonly content: PayloadContent;
  readonly headers: readonly string[];
  readonly heartbeatPeriodSeconds?: number;
  readonly timeoutSeconds?: number;
  readonly maxCount?: number;
}

export type SubscriptionKind = 'topic' | 'classic';

/** A subscription as the broker keeps it. `resource` is the client's FHIR Subscription, normalised. */
export interface SubscriptionRecord {
  readonly id: string;
  readonly owner: string;
  readonly kind: SubscriptionKind;
  /** Topic canonical for topic-based, the criteria string for classic. */
  readonly topic: string;
  readonly status: SubscriptionStatus;
  readonly error?: string;
  readonly match: MatchSpec;
  readonly channel: Channel;
  readonly webhookSecret: string;
  /** After a rotation, the old secret also signs until `until` (ISO), so receivers can switch over. */
  readonly previousSecret?: { readonly secret: string; readonly until: string };
  readonly end?: string;
  readonly eventsSinceStart: number;
  readonly createdAt: string;
  readonly updatedAt: string;
  /** The client's Subscription resource (without the webhook secret), as last written. */
  readonly resource: FhirResource;
}

/**
 * An earlier version of a subscription: what a client read until the next change (its own, or
 * the broker's, such as the handshake's `requested` → `active`). The store keeps the last few, so
 * a versioned `Location` or `ETag` a client holds can still be read (FHIR vread) after a change.
 */
export interface SubscriptionVersion {
  readonly updatedAt: string;
  readonly status: SubscriptionStatus;
  readonly error?: string;
  readonly resource: FhirResource;
}

/** One matched change queued for one subscription, numbered per subscription. */
export interface Notification {
  readonly subscriptionId: string;
  readonly eventNumber: number;
  readonly change: ResourceChange;
}

export type DeliveryState = 'pending' | 'delivered' | 'dead';

export interface StoredNotification extends Notification {
  readonly state: DeliveryState;
  readonly attempts: number;
  /** Epoch ms when the next attempt is due. */
  readonly dueAt: number;
  readonly lastError?: string;
  /**
   * Set on the first notification of a bundle before the bundle's first attempt (rest-hook
   * subscriptions with `max-count` above 1): the last event number of that bundle. The bundle goes
   * out again exactly so, under the same `webhook-id`, after a restart or on another instance,
   * rather than regrouped with what arrived since.
   */
  readonly bundleLast?: number;
}

/** A FHIR resource as untyped JSON: the broker reads only the fields it validates. */
export interface FhirResource {
  readonly resourceType: string;
  readonly id?: string;
  readonly [key: string]: unknown;
}

/** Time comes through a port so tests are exact and never sleep. */
export interface Clock {
  now(): number;
}

export interface IdSource {
  uuid(): string;
}

export const systemClock: Clock = { now: () => Date.now() };
