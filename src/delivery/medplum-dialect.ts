import type { ManyOutcome, SendOutcome, WebSocketPort } from './websocket-port.js';

/**
 * Medplum's WebSocket dialect, for its client's `subscribeToCriteria` (`SubscriptionManager` in
 * `@medplum/core`): it connects to `<base>/ws/subscriptions-r4`, binds with the JSON
 * `bind-with-token` the broker takes on `/ws`, and routes each bundle by an R5
 * `SubscriptionStatus` in its first entry (`type`, `subscription.reference` as
 * `Subscription/<id>`), where the backport IG on R4 has a `Parameters`. Sockets opened on that path
 * get the same bundles with that entry rewritten; everything else is the same on both paths.
 */

export const MEDPLUM_WS_PATH = '/ws/subscriptions-r4';

/** `medplum` for an upgrade request on MEDPLUM_WS_PATH. */
export function dialectOf(req: { readonly url?: string | undefined }): 'medplum' | undefined {
  return (req.url ?? '').split('?')[0] === MEDPLUM_WS_PATH ? 'medplum' : undefined;
}

interface Parameter {
  readonly name?: string;
  readonly valueCode?: string;
  readonly valueString?: string;
  readonly valueCanonical?: string;
  readonly valueInstant?: string;
  readonly valueReference?: { readonly reference?: string };
  readonly valueCodeableConcept?: unknown;
  readonly part?: readonly Parameter[];
}

interface Entry {
  readonly resource?: { readonly resourceType?: string; readonly id?: string; readonly parameter?: Parameter[] };
}

/**
 * A notification bundle (event, handshake, heartbeat) with its status `Parameters` as an R5
 * `SubscriptionStatus`; undefined for an `unbound` message (Medplum's client sends
 * `unbind-from-token` unanswered, and takes any message but a `pong` for a bundle); any other text
 * (an `error` message, a `pong`) as it is.
 */
export function medplumText(text: string): string | undefined {
  if (text.startsWith('{"type":"unbound"')) return undefined;
  if (!text.startsWith('{"resourceType":"Bundle"')) return text;
  const bundle = JSON.parse(text) as { entry?: Entry[] };
  const first = bundle.entry?.[0];
  const params = first?.resource?.resourceType === 'Parameters' ? (first.resource.parameter ?? []) : undefined;
  if (first === undefined || params === undefined) return text;
  const one = (name: string) => params.find((p) => p.name === name);
  const subscription = one('subscription')?.valueReference?.reference ?? '';
  // Medplum reads the id as the second segment of the reference.
  const id = subscription.slice(subscription.lastIndexOf('/') + 1);
  const events = params
    .filter((p) => p.name === 'notification-event')
    .map((p) => {
      const part = (name: string) => p.part?.find((q) => q.name === name);
      const focus = part('focus')?.valueReference;
      return {
        eventNumber: part('event-number')?.valueString,
        ...(part('timestamp')?.valueInstant === undefined ? {} : { timestamp: part('timestamp')?.valueInstant }),
        ...(focus === undefined ? {} : { focus }),
      };
    });
  const error = one('error')?.valueCodeableConcept;
  const status = {
    resourceType: 'SubscriptionStatus',
    ...(first.resource?.id === undefined ? {} : { id: first.resource.id }),
    status: one('status')?.valueCode,
    type: one('type')?.valueCode,
    eventsSinceSubscriptionStart: one('events-since-subscription-start')?.valueString,
    ...(events.length === 0 ? {} : { notificationEvent: events }),
    subscription: { reference: `Subscription/${id}` },
    ...(one('topic')?.valueCanonical === undefined ? {} : { topic: one('topic')?.valueCanonical }),
    ...(error === undefined ? {} : { error: [error] }),
  };
  // No `meta.profile`: the backport IG's notification profile has a `Parameters` there.
  const { meta: _backportProfile, ...rest } = bundle as { meta?: unknown; entry?: Entry[] };
  return JSON.stringify({ ...rest, entry: [{ ...first, resource: status }, ...(bundle.entry?.slice(1) ?? [])] });
}

/**
 * `port` with the connections `mark`ed (opened on MEDPLUM_WS_PATH) sent Medplum's shape; the
 * optional methods only where `port` has them.
 */
export function withMedplumDialect(port: WebSocketPort): {
  readonly port: WebSocketPort;
  mark(connectionId: string): void;
  forget(connectionId: string): void;
  has(connectionId: string): boolean;
} {
  const medplum = new Set<string>();
  const sendMany = port.sendMany?.bind(port);
  const wrapped: WebSocketPort = {
    send: async (connectionId, text): Promise<SendOutcome> => {
      if (!medplum.has(connectionId)) return port.send(connectionId, text);
      const theirs = medplumText(text);
      // Not sent, as Medplum's server sends none: counted as sent (the socket is there).
      return theirs === undefined ? 'sent' : port.send(connectionId, theirs);
    },
    close: (connectionId, code, reason) => port.close(connectionId, code, reason),
    isOpen: (connectionId) => port.isOpen(connectionId),
    ...(sendMany === undefined
      ? {}
      : {
          sendMany: async (ids: readonly string[], text: string): Promise<ManyOutcome> => {
            // The fan-out's path: no Medplum socket open (the usual case), nothing to look at.
            if (medplum.size === 0) return sendMany(ids, text);
            const theirs = ids.filter((id) => medplum.has(id));
            if (theirs.length === 0) return sendMany(ids, text);
            const ours = ids.filter((id) => !medplum.has(id));
            const converted = medplumText(text);
            const [a, b] = await Promise.all([
              sendMany(ours, text),
              converted === undefined ? { sent: theirs.length, gone: [] } : sendMany(theirs, converted),
            ]);
            return { sent: a.sent + b.sent, gone: [...a.gone, ...b.gone] };
          },
        }),
    ...(port.drained === undefined
      ? {}
      : { drained: (connectionId: string) => port.drained?.(connectionId) ?? Promise.resolve() }),
    ...(port.markBound === undefined
      ? {}
      : { markBound: (connectionId: string, bound: boolean) => port.markBound?.(connectionId, bound) }),
  };
  return {
    port: wrapped,
    mark: (connectionId) => medplum.add(connectionId),
    forget: (connectionId) => medplum.delete(connectionId),
    has: (connectionId) => medplum.has(connectionId),
  };
}
