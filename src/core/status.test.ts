import { describe, expect, it } from 'vitest';
import { BrokerError } from './errors.js';
import {
  applyStatusEvent,
  clientStatusChange,
  HANDSHAKE_FAILED,
  HEARTBEAT_FAILED,
  heartbeatsAllowed,
  type StatusEvent,
} from './status.js';
import type { SubscriptionStatus } from './types.js';

const STATUSES: readonly SubscriptionStatus[] = ['requested', 'active', 'error', 'off'];

describe('applyStatusEvent', () => {
  const handshakeOk: StatusEvent = { kind: 'handshake-succeeded' };
  const handshakeFailed: StatusEvent = { kind: 'handshake-failed', reason: 'endpoint answered 404' };
  const exhausted: StatusEvent = { kind: 'delivery-exhausted', reason: '7 attempts failed' };
  const gone: StatusEvent = { kind: 'endpoint-gone', reason: 'endpoint answered 410' };
  const refused: StatusEvent = { kind: 'heartbeat-refused', reason: 'endpoint refused: 10.0.0.1 is a private address' };
  const ended: StatusEvent = { kind: 'ended', reason: 'ended at 2026-01-01T00:00:00Z' };

  it.each<[string, StatusEvent, SubscriptionStatus, ReturnType<typeof applyStatusEvent>]>([
    ['a successful handshake activates a requested subscription', handshakeOk, 'requested', { status: 'active' }],
    ['a successful handshake does nothing when active', handshakeOk, 'active', undefined],
    ['a successful handshake does not revive an errored subscription', handshakeOk, 'error', undefined],
    ['a successful handshake does not revive an off subscription', handshakeOk, 'off', undefined],
    [
      'a failed handshake puts a requested subscription in error',
      handshakeFailed,
      'requested',
      { status: 'error', error: 'endpoint answered 404' },
    ],
    ['a failed handshake does nothing when active', handshakeFailed, 'active', undefined],
    ['a failed handshake does nothing when in error', handshakeFailed, 'error', undefined],
    ['a failed handshake does nothing when off', handshakeFailed, 'off', undefined],
    ['exhausted delivery does nothing while requested', exhausted, 'requested', undefined],
    [
      'exhausted delivery puts an active subscription in error',
      exhausted,
      'active',
      { status: 'error', error: '7 attempts failed' },
    ],
    ['exhausted delivery does nothing when already in error', exhausted, 'error', undefined],
    ['exhausted delivery does nothing when off', exhausted, 'off', undefined],
    ['a refused heartbeat does nothing while requested', refused, 'requested', undefined],
    [
      'a refused heartbeat puts an active subscription in error',
      refused,
      'active',
      { status: 'error', error: 'endpoint refused: 10.0.0.1 is a private address' },
    ],
    [
      'a refused heartbeat replaces the reason of a subscription in error (heartbeats stop by it)',
      refused,
      'error',
      { status: 'error', error: 'endpoint refused: 10.0.0.1 is a private address' },
    ],
    ['a refused heartbeat does nothing when off', refused, 'off', undefined],
    [
      'a gone endpoint switches a requested subscription off',
      gone,
      'requested',
      { status: 'off', error: 'endpoint answered 410' },
    ],
    [
      'a gone endpoint switches an active subscription off',
      gone,
      'active',
      { status: 'off', error: 'endpoint answered 410' },
    ],
    [
      'a gone endpoint switches an errored subscription off',
      gone,
      'error',
      { status: 'off', error: 'endpoint answered 410' },
    ],
    ['a gone endpoint leaves an off subscription alone', gone, 'off', undefined],
    ...(['requested', 'active', 'error'] as const).map(
      (from): [string, StatusEvent, SubscriptionStatus, ReturnType<typeof applyStatusEvent>] => [
        `a passed end switches a ${from} subscription off`,
        ended,
        from,
        { status: 'off', error: 'ended at 2026-01-01T00:00:00Z' },
      ],
    ),
    ['a passed end leaves an off subscription alone', ended, 'off', undefined],
  ])('%s', (_name, event, current, expected) => {
    expect(applyStatusEvent(current, event)).toEqual(expected);
  });

  it('never moves a subscription back to requested', () => {
    const events: StatusEvent[] = [handshakeOk, handshakeFailed, exhausted, refused, gone, ended];
    for (const current of STATUSES) {
      for (const event of events) expect(applyStatusEvent(current, event)?.status).not.toBe('requested');
    }
  });
});

describe('clientStatusChange', () => {
  it.each<[SubscriptionStatus, SubscriptionStatus | undefined, boolean, SubscriptionStatus]>([
    // Asking for off always switches off.
    ['requested', 'off', false, 'off'],
    ['active', 'off', true, 'off'],
    ['error', 'off', false, 'off'],
    ['off', 'off', false, 'off'],
    // Asking for requested always restarts the handshake.
    ['requested', 'requested', false, 'requested'],
    ['active', 'requested', false, 'requested'],
    ['error', 'requested', false, 'requested'],
    ['off', 'requested', false, 'requested'],
    // Active and unchanged stays active; a new channel must be verified again.
    ['active', 'active', false, 'active'],
    ['active', 'active', true, 'requested'],
    ['active', undefined, false, 'active'],
    ['active', undefined, true, 'requested'],
    // Asking for active on an inactive subscription re-activates it through the handshake.
    ['requested', 'active', false, 'requested'],
    ['error', 'active', false, 'requested'],
    ['off', 'active', false, 'requested'],
    // No status asked: an off subscription stays off, the others go (back) through the handshake.
    ['off', undefined, false, 'off'],
    ['off', undefined, true, 'off'],
    ['requested', undefined, false, 'requested'],
    ['error', undefined, false, 'requested'],
    ['error', undefined, true, 'requested'],
    // A subscription in error PUT back as read (read-modify-write) stays in error, whatever else changed.
    ['error', 'error', false, 'error'],
    ['error', 'error', true, 'error'],
  ])('%s asked %s (channel changed: %s) → %s', (current, asked, channelChanged, expected) => {
    expect(clientStatusChange(current, asked, channelChanged)).toBe(expected);
  });

  it.each(STATUSES.filter((s) => s !== 'error'))('refuses a client asking for error from %s', (current) => {
    let caught: unknown;
    try {
      clientStatusChange(current, 'error', false);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(BrokerError);
    expect((caught as BrokerError).code).toBe('INVALID_STATUS_CHANGE');
    expect((caught as BrokerError).expression).toBe('Subscription.status');
    expect((caught as BrokerError).status).toBe(422);
  });
});

describe('heartbeatsAllowed', () => {
  it.each<[string, { status: SubscriptionStatus; error?: string; kind?: 'topic' | 'classic' }, boolean]>([
    ['an active subscription', { status: 'active' }, true],
    ['an active topic-based subscription', { status: 'active', kind: 'topic' }, true],
    [
      'an active classic R4 subscription (stored with a heartbeat period before it was refused)',
      { status: 'active', kind: 'classic' },
      false,
    ],
    [
      'one in error after its deliveries failed',
      { status: 'error', error: 'delivery failed after 7 attempt(s): HTTP 503' },
      true,
    ],
    ['one in error because its handshake failed', { status: 'error', error: `${HANDSHAKE_FAILED}HTTP 503` }, false],
    [
      'one in error because the SSRF guard refused a heartbeat',
      { status: 'error', error: `${HEARTBEAT_FAILED}endpoint refused: 10.0.0.1 is a private address` },
      false,
    ],
    ['a requested one (not yet verified)', { status: 'requested' }, false],
    ['an off one', { status: 'off', error: 'endpoint answered 410 Gone' }, false],
  ])('%s', (_name, sub, allowed) => {
    expect(heartbeatsAllowed(sub)).toBe(allowed);
  });
});
