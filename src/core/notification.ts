import { BACKPORT_PROFILE, BROKER_EXT } from './fhir-urls.js';
import type {
  FhirResource,
  Interaction,
  Notification,
  PayloadContent,
  StoredNotification,
  SubscriptionRecord,
} from './types.js';

/**
 * Notification bundles of the Subscriptions R5 Backport IG on R4: a `history` Bundle whose first
 * entry is the `Parameters` subscription status, then one entry per focus resource (id-only and
 * full-resource; the latter with the resource in it, when the broker could read it) with `request`
 * and `response` as a history Bundle requires (bdl-3, bdl-4).
 */

export type NotificationType = 'handshake' | 'heartbeat' | 'event-notification' | 'query-status' | 'query-event';

export type StatusSource = Pick<SubscriptionRecord, 'id' | 'kind' | 'topic' | 'status' | 'error' | 'eventsSinceStart'>;

export interface BundleContext {
  /** Broker FHIR base, e.g. `http://127.0.0.1:8080/fhir`. */
  readonly fhirBase: string;
  /** Fresh ids for the bundle and the status Parameters. */
  readonly newId: () => string;
  readonly timestamp: string;
}

const REQUEST: Readonly<Record<Interaction, { method: string; status: string }>> = {
  create: { method: 'POST', status: '201' },
  update: { method: 'PUT', status: '200' },
  delete: { method: 'DELETE', status: '204' },
};

/**
 * Whether the status names the topic: a topic-based subscription's, except in an `empty` payload,
 * where the IG's status profile says `topic` SHOULD NOT be present (empty content tells the channel
 * nothing about what changed). A `$status` answer (query-status) is no payload: it keeps the topic.
 */
function namesTopic(sub: StatusSource, type: NotificationType, content: PayloadContent): boolean {
  return sub.kind === 'topic' && (content !== 'empty' || type === 'query-status');
}

export function buildStatusParameters(
  sub: StatusSource,
  type: NotificationType,
  events: readonly Notification[],
  content: PayloadContent,
  ctx: BundleContext,
): FhirResource {
  const parameter: unknown[] = [
    { name: 'subscription', valueReference: { reference: `${ctx.fhirBase}/Subscription/${sub.id}` } },
  ];
  if (namesTopic(sub, type, content)) parameter.push({ name: 'topic', valueCanonical: sub.topic });
  parameter.push(
    { name: 'status', valueCode: sub.status },
    { name: 'type', valueCode: type },
    { name: 'events-since-subscription-start', valueString: String(sub.eventsSinceStart) },
  );
  for (const n of events) {
    const part: unknown[] = [
      { name: 'event-number', valueString: String(n.eventNumber) },
      { name: 'timestamp', valueInstant: n.change.time },
    ];
    const focus = focusOf(n, content);
    if (focus !== undefined) part.push({ name: 'focus', valueReference: { reference: focus } });
    else if (content !== 'empty') part.push({ name: 'focus', valueReference: unnamedFocus(n) });
    parameter.push({ name: 'notification-event', part });
  }
  if (sub.status === 'error' && sub.error !== undefined) {
    parameter.push({ name: 'error', valueCodeableConcept: { text: sub.error } });
  }
  return {
    resourceType: 'Parameters',
    id: ctx.newId(),
    meta: { profile: [BACKPORT_PROFILE.status] },
    parameter,
  };
}

export function buildNotificationBundle(
  sub: StatusSource,
  type: NotificationType,
  events: readonly Notification[],
  content: PayloadContent,
  ctx: BundleContext,
): FhirResource {
  const status = buildStatusParameters(sub, type, events, content, ctx);
  const entry: unknown[] = [
    {
      fullUrl: `urn:uuid:${status.id}`,
      resource: status,
      request: { method: 'GET', url: `${ctx.fhirBase}/Subscription/${sub.id}/$status` },
      response: { status: '200' },
    },
  ];
  if (content !== 'empty') {
    for (const n of events) {
      const focus = focusOf(n, content);
      if (focus === undefined) continue;
      const { resourceType, resourceId, interaction } = n.change;
      const req = REQUEST[interaction];
      const resource = carried(n, content);
      entry.push({
        fullUrl: focus,
        ...(resource === undefined ? {} : { resource: JSON.parse(resource) as unknown }),
        request: { method: req.method, url: interaction === 'create' ? resourceType : `${resourceType}/${resourceId}` },
        response: { status: req.status, lastModified: n.change.time },
      });
    }
  }
  return {
    resourceType: 'Bundle',
    id: ctx.newId(),
    meta: { profile: [BACKPORT_PROFILE.notification] },
    type: 'history',
    timestamp: ctx.timestamp,
    entry,
  };
}

/**
 * Adds to each `notification-event` of a `$events` answer (`bundle`, built from `notes`) how its
 * delivery stands, in the broker's `delivery` extension (every element takes extensions; the IG
 * has no element for it): `state` (`pending`, `delivered`, `dead`), `attempts` made, and while it
 * is pending or once dead-lettered, `lastError`; while pending after a failed attempt with the
 * subscription `active`, `due`, the instant before which it is not tried again. A client that sees
 * a gap in event numbers learns whether the missing ones are on their way or were dead-lettered,
 * and why, without asking the operator.
 */
export function withDeliveryStates(
  bundle: FhirResource,
  notes: readonly StoredNotification[],
  sub: Pick<SubscriptionRecord, 'status'>,
): FhirResource {
  const status = (bundle.entry as { resource: { parameter: Param[] } }[] | undefined)?.[0]?.resource;
  // One notification-event per note, in their order (buildStatusParameters), whatever the content.
  const events = (status?.parameter ?? []).filter((p) => p.name === 'notification-event');
  events.forEach((param, i) => {
    const n = notes[i];
    if (n === undefined || param.part?.[0]?.valueString !== String(n.eventNumber)) return;
    const extension: unknown[] = [
      { url: 'state', valueCode: n.state },
      { url: 'attempts', valueUnsignedInt: n.attempts },
    ];
    if (n.state === 'pending' && n.attempts > 0 && sub.status === 'active') {
      extension.push({ url: 'due', valueInstant: new Date(n.dueAt).toISOString() });
    }
    // Not for an attempt a re-activation started over (none made since: the error is of before it),
    // and never empty (a FHIR string is not).
    if (n.state !== 'delivered' && (n.attempts > 0 || n.state === 'dead') && n.lastError) {
      extension.push({ url: 'lastError', valueString: n.lastError });
    }
    param.extension = [{ url: BROKER_EXT.delivery, extension }];
  });
  return bundle;
}

interface Param {
  name?: string;
  part?: { name?: string; valueString?: string }[];
  extension?: unknown[];
}

/**
 * `JSON.stringify(buildNotificationBundle(...))`, written straight to a string: the same bytes
 * (notification.test.ts compares them over thousands of random inputs), without building the
 * objects first. Every webhook body goes through here; building and serializing the objects cost
 * about as much as the rest of handing a notification to the sender.
 */
export function notificationBundleJson(
  sub: StatusSource,
  type: NotificationType,
  events: readonly Notification[],
  content: PayloadContent,
  ctx: BundleContext,
): string {
  const q = JSON.stringify;
  const statusId = ctx.newId();
  const subscriptionUrl = `${ctx.fhirBase}/Subscription/${sub.id}`;
  let params = `{"name":"subscription","valueReference":{"reference":${q(subscriptionUrl)}}}`;
  if (namesTopic(sub, type, content)) params += `,{"name":"topic","valueCanonical":${q(sub.topic)}}`;
  params +=
    `,{"name":"status","valueCode":${q(sub.status)}},{"name":"type","valueCode":${q(type)}}` +
    `,{"name":"events-since-subscription-start","valueString":${q(String(sub.eventsSinceStart))}}`;
  let focusEntries = '';
  for (const n of events) {
    const time = q(n.change.time);
    const focus = focusOf(n, content);
    params += `,{"name":"notification-event","part":[{"name":"event-number","valueString":${q(String(n.eventNumber))}},{"name":"timestamp","valueInstant":${time}}`;
    if (focus === undefined) {
      params += content === 'empty' ? ']}' : `,{"name":"focus","valueReference":${q(unnamedFocus(n))}}]}`;
      continue;
    }
    const ref = q(focus);
    params += `,{"name":"focus","valueReference":{"reference":${ref}}}]}`;
    const { resourceType, resourceId, interaction } = n.change;
    const req = REQUEST[interaction];
    const url = interaction === 'create' ? resourceType : `${resourceType}/${resourceId}`;
    const resource = carried(n, content);
    focusEntries += `,{"fullUrl":${ref}${resource === undefined ? '' : `,"resource":${resource}`},"request":{"method":"${req.method}","url":${q(url)}},"response":{"status":"${req.status}","lastModified":${time}}}`;
  }
  if (sub.status === 'error' && sub.error !== undefined) {
    params += `,{"name":"error","valueCodeableConcept":{"text":${q(sub.error)}}}`;
  }
  const status = `{"resourceType":"Parameters","id":${q(statusId)},"meta":{"profile":[${q(BACKPORT_PROFILE.status)}]},"parameter":[${params}]}`;
  const bundleId = ctx.newId();
  return (
    `{"resourceType":"Bundle","id":${q(bundleId)},"meta":{"profile":[${q(BACKPORT_PROFILE.notification)}]}` +
    `,"type":"history","timestamp":${q(ctx.timestamp)},"entry":[{"fullUrl":${q(`urn:uuid:${statusId}`)},"resource":${status}` +
    `,"request":{"method":"GET","url":${q(`${subscriptionUrl}/$status`)}},"response":{"status":"200"}}${focusEntries}]}`
  );
}

/**
 * `$status` answer: a searchset of status Parameters, one per subscription; none has no `entry`
 * (R4 JSON has no empty arrays).
 */
export function buildStatusBundle(subs: readonly StatusSource[], ctx: BundleContext): FhirResource {
  const bundle = {
    resourceType: 'Bundle',
    id: ctx.newId(),
    type: 'searchset',
    timestamp: ctx.timestamp,
    total: subs.length,
  };
  if (subs.length === 0) return bundle;
  const entry = subs.map((sub) => {
    // No events, so no focus: the content level changes nothing here (query-status keeps the topic).
    const resource = buildStatusParameters(sub, 'query-status', [], 'empty', ctx);
    return { fullUrl: `urn:uuid:${resource.id}`, resource, search: { mode: 'match' } };
  });
  return { ...bundle, entry };
}

/**
 * The focus of an event that names no resource (an older CloudTrail shape): the IG has id-only
 * notifications carry a focus (SHALL), and a Reference may name what it cannot point to. Its type,
 * and which server, in words; no bundle entry, which would need the resource's URL.
 */
function unnamedFocus(n: Notification): { type: string; display: string } {
  const { resourceType, fhirBase } = n.change;
  return { type: resourceType, display: `${resourceType} on ${fhirBase}; the change event names no id` };
}

/** The resource's JSON, when the content is full-resource and the notification carries it (never a delete's). */
function carried(n: Notification, content: PayloadContent): string | undefined {
  return content === 'full-resource' && n.change.interaction !== 'delete' ? n.change.resource : undefined;
}

/** The changed resource's absolute URL on the FHIR server, when content and the event allow one. */
function focusOf(n: Notification, content: PayloadContent): string | undefined {
  if (content === 'empty' || n.change.resourceId === undefined) return undefined;
  return `${n.change.fhirBase}/${n.change.resourceType}/${n.change.resourceId}`;
}
