import type { SubscriptionStatus } from './types.js';

/**
 * The broker's own lifecycle events, for other automation (EventBridge when `BROKER_EVENT_BUS`
 * is set). `source` is `fhir-subscription-broker`; `detail-type` is the event's `type`.
 */

export const LIFECYCLE_SOURCE = 'fhir-subscription-broker';

export type LifecycleEvent =
  | {
      readonly type: 'Subscription Status Changed';
      readonly subscriptionId: string;
      readonly owner: string;
      readonly from: SubscriptionStatus;
      readonly to: SubscriptionStatus;
      readonly reason?: string;
      readonly time: string;
    }
  | {
      readonly type: 'Notification Dead-Lettered';
      readonly subscriptionId: string;
      readonly owner: string;
      readonly eventNumbers: readonly number[];
      readonly reason: string;
      readonly time: string;
    }
  | {
      readonly type: 'Endpoint Disabled';
      readonly subscriptionId: string;
      readonly owner: string;
      /** Scheme, host and port only: paths and queries may carry secrets. */
      readonly endpointOrigin: string;
      readonly reason: string;
      readonly time: string;
    };

export interface LifecycleSink {
  publish(event: LifecycleEvent): void;
  /** Resolves when everything published so far has been handed over (or given up on and logged). */
  flush(): Promise<void>;
}

export const noLifecycleSink: LifecycleSink = { publish() {}, flush: async () => {} };
