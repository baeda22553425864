import type { Interaction, ResourceChange, SubscriptionRecord } from '../../src/core/types.js';
import type { AcceptItem, AcceptOutcome, DeliveryUpdate, Store } from '../../src/store/store.js';

/** Records and changes for the Store contract suite and adapter-specific store tests. */

export const T0 = '2030-01-01T00:00:00.000Z';
export const RECEIVED = Date.parse('2030-01-02T00:00:00Z');

export function record(id: string, overrides: Partial<SubscriptionRecord> = {}): SubscriptionRecord {
  return {
    id,
    owner: 'alice',
    kind: 'topic',
    topic: 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change',
    status: 'active',
    match: { resourceTypes: ['Patient'], interactions: ['create', 'update', 'delete'] },
    channel: {
      type: 'rest-hook',
      endpoint: 'https://hooks.example.com/x',
      payload: 'application/fhir+json',
      content: 'id-only',
      headers: ['Authorization: Bearer t'],
      heartbeatPeriodSeconds: 60,
    },
    webhookSecret: `whsec_${Buffer.alloc(32, 1).toString('base64')}`,
    eventsSinceStart: 0,
    createdAt: T0,
    updatedAt: T0,
    resource: {
      resourceType: 'Subscription',
      reason: 'test',
      criteria: 'https://fhir-subscription-broker.org/fhir/SubscriptionTopic/patient-change',
      channel: { type: 'rest-hook', endpoint: 'https://hooks.example.com/x' },
    },
    ...overrides,
  };
}

export function change(eventId: string, resourceId?: string, interaction: Interaction = 'update'): ResourceChange {
  return {
    eventId,
    resourceType: 'Patient',
    ...(resourceId === undefined ? {} : { resourceId }),
    interaction,
    datastoreId: 'ds1',
    fhirBase: 'https://healthlake.us-east-1.amazonaws.com/datastore/ds1/r4',
    time: '2030-01-01T12:00:00.000Z',
  };
}

export function item(eventId: string, subscriptionIds: string[], resourceId = 'p1'): AcceptItem {
  return { change: change(eventId, resourceId), subscriptionIds };
}

/** The updates that mark every notification of `outcomes` delivered on its first attempt, at `at`. */
export function deliveredAll(outcomes: readonly AcceptOutcome[], at: number): DeliveryUpdate[] {
  return outcomes.flatMap((o) =>
    o.notifications.map((n) => ({
      subscriptionId: n.subscriptionId,
      eventNumber: n.eventNumber,
      state: 'delivered' as const,
      attempts: 1,
      dueAt: at,
    })),
  );
}

/** Subscription `subscriptionId` with `count` notifications received at RECEIVED and delivered: all past a later cut-off. */
export async function seedDelivered(store: Store, subscriptionId: string, count: number): Promise<void> {
  await store.insertSubscription(record(subscriptionId));
  const outcomes = await store.acceptChanges(
    Array.from({ length: count }, (_, i) => item(`old-${i}`, [subscriptionId], `p-${i}`)),
    RECEIVED,
  );
  await store.recordDeliveries(deliveredAll(outcomes, RECEIVED));
}

/** `real` with one method replaced (the others bound to `real`): a store a test can hold at one point. */
export function withMethod<K extends keyof Store>(real: Store, name: K, impl: Store[K]): Store {
  return new Proxy(real, {
    get(target, prop) {
      if (prop === name) return impl;
      const value = Reflect.get(target, prop, target) as unknown;
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}
