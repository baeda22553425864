import type { SubscriptionRecord } from '../../src/core/types.js';
import { WebSocketChannel } from '../../src/delivery/websocket-channel.js';
import { type BindingStore, InMemoryBindings, type WebSocketPort } from '../../src/delivery/websocket-port.js';
import type { BindingTokens } from '../../src/delivery/ws-binding-token.js';
import { silentLogger } from '../../src/observability/logger.js';
import { Metrics } from '../../src/observability/metrics.js';
import type { Store } from '../../src/store/store.js';

/**
 * A `WebSocketChannel` for tests that drive it directly: over `port`, with subscriptions from
 * `get` (a registry whose `refresh` reads nothing), in-memory bindings unless given, and a store
 * that is only what the test passes (none: a catch-up is never asked for).
 */
export function channelOver(
  port: WebSocketPort,
  get: (id: string) => SubscriptionRecord | undefined,
  tokens: BindingTokens,
  options: { store?: Store; bindings?: BindingStore } = {},
): WebSocketChannel {
  return new WebSocketChannel({
    port,
    bindings: options.bindings ?? new InMemoryBindings(),
    registry: { get, refresh: async () => undefined },
    store: options.store ?? ({} as Store),
    tokens,
    clock: { now: () => Date.now() },
    ids: { uuid: () => 'u' },
    logger: silentLogger,
    metrics: new Metrics(),
    fhirBase: 'http://b/fhir',
  });
}
