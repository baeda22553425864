import { BrokerError } from './errors.js';
import type { SubscriptionStatus } from './types.js';

/**
 * The subscription status machine: requested → active → error → off. The broker moves a
 * subscription forward (handshake, failures, 410); only the client moves it back to `requested`.
 */

export type StatusEvent =
  | { readonly kind: 'handshake-succeeded' }
  | { readonly kind: 'handshake-failed'; readonly reason: string }
  | { readonly kind: 'delivery-exhausted'; readonly reason: string }
  | { readonly kind: 'endpoint-gone'; readonly reason: string }
  /** The SSRF guard refused a heartbeat's endpoint (say, its name now resolves to a private address). */
  | { readonly kind: 'heartbeat-refused'; readonly reason: string }
  /** `Subscription.end` has passed: "the time for the server to turn the subscription off" (R4). */
  | { readonly kind: 'ended'; readonly reason: string };

export interface StatusChange {
  readonly status: SubscriptionStatus;
  readonly error?: string;
}

/** How the error of a subscription whose handshake failed begins (the reason follows). */
export const HANDSHAKE_FAILED = 'handshake failed: ';

/**
 * How the error of a subscription whose heartbeat the SSRF guard refused begins (the guard's reason
 * follows). Only a refusal is recorded: a heartbeat that merely failed changes no status.
 */
export const HEARTBEAT_FAILED = 'heartbeat failed: ';

/**
 * Whether heartbeats go to the subscription's endpoint: while it is active, and in `error` after
 * its deliveries failed (a heartbeat then carries the error), but never to an endpoint whose
 * handshake failed: it never consented with a 2xx, and heartbeats there would make the broker a
 * source of unsolicited signed requests to any URL a client names. Nor to one the SSRF guard
 * refused a heartbeat: the refusal is kept in the subscription's error, so it holds across
 * restarts and on every instance (on AWS each scheduled run decides afresh from the store).
 */
export function heartbeatsAllowed(sub: {
  readonly status: SubscriptionStatus;
  readonly error?: string;
  readonly kind?: 'topic' | 'classic';
}): boolean {
  // None for a classic R4 Subscription (refused at registration; one stored before): R4 has no
  // heartbeats, its empty POST would read as a change, and it made no handshake to consent.
  if (sub.kind === 'classic') return false;
  if (sub.status === 'active') return true;
  const error = sub.error ?? '';
  return sub.status === 'error' && !error.startsWith(HANDSHAKE_FAILED) && !error.startsWith(HEARTBEAT_FAILED);
}

/** Broker-driven transitions; returns undefined when the event does not apply in this status. */
export function applyStatusEvent(current: SubscriptionStatus, event: StatusEvent): StatusChange | undefined {
  switch (event.kind) {
    case 'handshake-succeeded':
      return current === 'requested' ? { status: 'active' } : undefined;
    case 'handshake-failed':
      return current === 'requested' ? { status: 'error', error: event.reason } : undefined;
    case 'delivery-exhausted':
      return current === 'active' ? { status: 'error', error: event.reason } : undefined;
    case 'heartbeat-refused':
      // From `error` too: heartbeats still go to a subscription whose deliveries failed, and only the
      // new reason stops them.
      return current === 'active' || current === 'error' ? { status: 'error', error: event.reason } : undefined;
    case 'endpoint-gone':
    case 'ended':
      return current === 'off' ? undefined : { status: 'off', error: event.reason };
    default: {
      const never: never = event;
      throw new Error(`unhandled status event ${JSON.stringify(never)}`);
    }
  }
}

/**
 * The status a client's PUT leads to. `channelChanged`: a new endpoint must be verified again.
 * Asking for `active` on an inactive subscription is taken as asking to re-activate it. `error`
 * is the broker's to set, but a client that read a subscription in `error` and PUTs it back
 * (read-modify-write) echoes it: that changes no status. `endpointChanged`: not with a new
 * endpoint, which has answered no handshake (a subscription in `error` still gets heartbeats).
 */
export function clientStatusChange(
  current: SubscriptionStatus,
  asked: SubscriptionStatus | undefined,
  channelChanged: boolean,
  endpointChanged = false,
): SubscriptionStatus {
  switch (asked) {
    case 'off':
      return 'off';
    case 'error':
      if (current === 'error' && endpointChanged) {
        throw new BrokerError(
          'INVALID_STATUS_CHANGE',
          'A new endpoint must answer a handshake first: send status requested to move the subscription and re-activate it',
          { expression: 'Subscription.status' },
        );
      }
      if (current === 'error') return 'error';
      throw new BrokerError(
        'INVALID_STATUS_CHANGE',
        'Only the broker sets status error; send requested to re-activate',
        {
          expression: 'Subscription.status',
        },
      );
    case 'requested':
      return 'requested';
    case 'active':
    case undefined:
      if (current === 'active' && !channelChanged) return 'active';
      if (current === 'off' && asked === undefined) return 'off';
      return 'requested';
    default: {
      const never: never = asked;
      throw new Error(`unhandled status ${String(never)}`);
    }
  }
}
