import { readFileSync } from 'node:fs';
import { expect } from 'vitest';

/** Small helpers for driving the broker over HTTP in tests. */

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
export const TOPIC = 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic';

export type Json = Record<string, unknown>;

export function fixture(name: string): Json {
  return JSON.parse(readFileSync(`test/fixtures/${name}.json`, 'utf8')) as Json;
}

/**
 * A fixture as another API call: a new EventBridge id (the deduplication key) and the same new CloudTrail eventID (and
 * optionally another resource id).
 */
export function eventLike(name: string, eventId: string, resourceId?: string): Json {
  const event = fixture(name);
  const detail = event.detail as Json;
  const extra = detail.additionalEventData as Json | undefined;
  return {
    ...event,
    id: eventId,
    detail: {
      ...detail,
      eventID: eventId,
      ...(resourceId === undefined || extra === undefined ? {} : { additionalEventData: { ...extra, resourceId } }),
    },
  };
}

export function topicSubscription(
  topic: string,
  endpoint: string,
  options: { filters?: string[]; content?: 'empty' | 'id-only' | 'full-resource'; extra?: Json; channel?: Json } = {},
): Json {
  return {
    resourceType: 'Subscription',
    meta: { profile: [`${BACKPORT}/backport-subscription`] },
    status: 'requested',
    reason: 'test',
    criteria: `${TOPIC}/${topic}`,
    ...(options.filters === undefined
      ? {}
      : {
          _criteria: {
            extension: options.filters.map((f) => ({ url: `${BACKPORT}/backport-filter-criteria`, valueString: f })),
          },
        }),
    channel: {
      type: 'rest-hook',
      endpoint,
      payload: 'application/fhir+json',
      _payload: {
        extension: [{ url: `${BACKPORT}/backport-payload-content`, valueCode: options.content ?? 'id-only' }],
      },
      ...options.channel,
    },
    ...options.extra,
  };
}

export function classicSubscription(criteria: string, endpoint: string): Json {
  return {
    resourceType: 'Subscription',
    status: 'requested',
    reason: 'test',
    criteria,
    channel: { type: 'rest-hook', endpoint },
  };
}

export class Client {
  constructor(
    readonly base: string,
    readonly token: string,
  ) {}

  async call(
    method: string,
    path: string,
    body?: unknown,
    headers: Record<string, string> = {},
  ): Promise<{ status: number; body: Json; headers: Headers }> {
    const res = await fetch(`${this.base}${path}`, {
      method,
      headers: {
        authorization: `Bearer ${this.token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/fhir+json' }),
        ...headers,
      },
      ...(body === undefined ? {} : { body: typeof body === 'string' ? body : JSON.stringify(body) }),
    });
    const text = await res.text();
    return { status: res.status, body: text === '' ? {} : (JSON.parse(text) as Json), headers: res.headers };
  }

  async create(sub: Json): Promise<Json> {
    const res = await this.call('POST', '/fhir/Subscription', sub);
    if (res.status !== 201) throw new Error(`create failed ${res.status}: ${JSON.stringify(res.body)}`);
    return res.body;
  }

  async postEvents(events: unknown, token: string): Promise<{ status: number; body: Json }> {
    const res = await fetch(`${this.base}/events`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify(events),
    });
    return { status: res.status, body: (await res.json()) as Json };
  }
}

/** The status Parameters of a notification bundle, as a name → parameter map. */
export function statusOf(bundle: Json): { params: Map<string, Json>; events: Json[] } {
  const entry = (bundle.entry as Json[])[0] as Json;
  const parameters = ((entry.resource as Json).parameter as Json[]) ?? [];
  const params = new Map<string, Json>();
  const events: Json[] = [];
  for (const p of parameters) {
    if (p.name === 'notification-event') events.push(p);
    else params.set(p.name as string, p);
  }
  return { params, events };
}

export function eventNumbers(bundle: Json): number[] {
  return statusOf(bundle).events.map((e) =>
    Number(((e.part as Json[]).find((p) => p.name === 'event-number') as Json).valueString),
  );
}

/** The event numbers carried by the event-notification bundles among `requests` (handshakes, heartbeats skipped), in order. */
export function notifiedNumbers(requests: readonly { readonly body: string }[]): number[] {
  return requests
    .map((r) => JSON.parse(r.body) as Json)
    .filter((b) => statusOf(b).params.get('type')?.valueCode === 'event-notification')
    .flatMap(eventNumbers);
}

export function focusOf(eventParam: Json): string | undefined {
  const focus = (eventParam.part as Json[]).find((p) => p.name === 'focus');
  return (focus?.valueReference as Json | undefined)?.reference as string | undefined;
}

/**
 * The Subscription entry of the broker's CapabilityStatement: the backport profile, the topics as
 * topic-canonical extensions (R4 has no SubscriptionTopic type), the operations.
 */
export function expectSubscriptionCapability(subscription: Json): void {
  expect(subscription.supportedProfile).toEqual([`${BACKPORT}/backport-subscription`]);
  expect((subscription.extension as Json[]).map((e) => e.valueCanonical).sort()).toEqual(
    ['encounter-change', 'observation-change', 'patient-change', 'resource-change'].map((t) => `${TOPIC}/${t}`),
  );
  expect((subscription.operation as Json[]).map((o) => o.name)).toEqual([
    'status',
    'events',
    'get-ws-binding-token',
    'expunge',
  ]);
}
