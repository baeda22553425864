import { buildNotificationBundle, type NotificationType } from '../core/notification.js';
import type { Clock, IdSource, Notification, SubscriptionRecord } from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { SubscriptionRegistry } from '../service/subscription-registry.js';
import type { Store } from '../store/store.js';
import { type Binding, type BindingStore, CLOSE, type SendOutcome, type WebSocketPort } from './websocket-port.js';
import { type ClientMessage, parseClientMessage } from './websocket-protocol.js';
import { BindingTokenError, type BindingTokens } from './ws-binding-token.js';

/**
 * The websocket channel of the backport IG, independent of the socket layer: binding (token or
 * R4 `bind`), handshake, catch-up from stored notifications, and live delivery.
 *
 * Catch-up without gaps or duplicates: while a binding catches up, live messages for it are held;
 * once the stored range is sent, held messages newer than what was sent follow, then it is live.
 */

export interface Connection {
  readonly id: string;
  /** Owner proven by `Authorization: Bearer <API key>` at upgrade (needed for R4 `bind`). */
  readonly apiOwner?: string;
}

/** Stored notifications read per page during a catch-up. */
const CATCH_UP_PAGE = 500;

interface Held {
  readonly text: string;
  readonly lastEventNumber: number;
  /** The message without the events at or below `sent` (a bundle of several that a catch-up overlapped). */
  readonly after: (sent: number) => string;
}

export class WebSocketChannel {
  readonly #port: WebSocketPort;
  readonly #bindings: BindingStore;
  readonly #registry: SubscriptionRegistry;
  readonly #store: Store;
  readonly #tokens: BindingTokens;
  readonly #clock: Clock;
  readonly #ids: IdSource;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #fhirBase: string;
  /** Connection → subscription → messages held while that binding catches up. */
  readonly #catchingUp = new PerConnection<Held[]>();
  /** Connection → subscription → highest event number its catch-up sent (later live copies are skipped). */
  readonly #caughtUpTo = new PerConnection<number>();

  constructor(deps: {
    port: WebSocketPort;
    bindings: BindingStore;
    registry: SubscriptionRegistry;
    store: Store;
    tokens: BindingTokens;
    clock: Clock;
    ids: IdSource;
    logger: Logger;
    metrics: Metrics;
    fhirBase: string;
  }) {
    this.#port = deps.port;
    this.#bindings = deps.bindings;
    this.#registry = deps.registry;
    this.#store = deps.store;
    this.#tokens = deps.tokens;
    this.#clock = deps.clock;
    this.#ids = deps.ids;
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
    this.#fhirBase = deps.fhirBase;
  }

  /** One text message from a client. Protocol errors close only that connection. */
  async onMessage(conn: Connection, text: string): Promise<void> {
    const msg = parseClientMessage(text);
    switch (msg.kind) {
      case 'bind-with-token':
        return this.#bindWithToken(conn, msg);
      case 'unbind':
        await this.#bindings.unbind(conn.id, msg.subscriptionId);
        // Its last binding gone, the socket has the bind window again to bind, then is closed: an
        // `unbind` is no way to hold a socket without a binding (a bare one is valid with none).
        await this.#reportBound(conn.id);
        if (msg.subscriptionId === undefined) {
          this.#catchingUp.forget(conn.id);
          this.#caughtUpTo.forget(conn.id);
        } else {
          this.#catchingUp.delete(conn.id, msg.subscriptionId);
          this.#caughtUpTo.delete(conn.id, msg.subscriptionId);
        }
        await this.#port.send(
          conn.id,
          msg.json
            ? JSON.stringify({ type: 'unbound', payload: { subscription: msg.subscriptionId ?? null } })
            : `unbound${msg.subscriptionId === undefined ? '' : ` ${msg.subscriptionId}`}`,
        );
        return;
      case 'bind':
        return this.#bindR4(conn, msg.subscriptionId);
      case 'invalid':
        this.#metrics.inc('broker_websocket_protocol_errors_total');
        await this.#port.close(conn.id, CLOSE.policy, msg.reason.slice(0, 120));
        return;
      default: {
        const never: never = msg;
        throw new Error(`unhandled message ${JSON.stringify(never)}`);
      }
    }
  }

  /**
   * The subscription was deleted, turned off, or moved to another channel: every socket bound to
   * it is told (`unbound <id>`, or its JSON form for bundle clients) and unbound, as a new bind
   * would be refused; a socket left with no binding is closed (4003) at once, so that a client
   * (the live page) knows that binding again cannot help. Heartbeats and events had simply
   * stopped, and a client could not tell a quiet subscription from a dead one.
   */
  async subscriptionChanged(id: string): Promise<void> {
    const sub = this.#registry.get(id);
    if (sub !== undefined && sub.status !== 'off' && sub.channel.type === 'websocket') return;
    const why = sub === undefined ? 'deleted' : sub.status === 'off' ? 'off' : 'no longer a websocket subscription';
    for (const b of await this.#bindings.bindingsFor(id)) {
      await this.#bindings.unbind(b.connectionId, id);
      this.#catchingUp.delete(b.connectionId, id);
      this.#caughtUpTo.delete(b.connectionId, id);
      const text =
        b.mode === 'r4'
          ? `unbound ${id}`
          : JSON.stringify({ type: 'unbound', payload: { subscription: id, reason: `Subscription/${id} is ${why}` } });
      if ((await this.#port.send(b.connectionId, text)) !== 'sent') continue;
      const bound = (await this.#bindings.bindingsOf(b.connectionId)).length > 0;
      // The socket layer hears it too: should the close below not happen, its bind window does.
      this.#port.markBound?.(b.connectionId, bound);
      if (!bound) await this.#port.close(b.connectionId, CLOSE.bindRefused, `Subscription/${id} is ${why}`);
    }
  }

  async onClose(connectionId: string): Promise<void> {
    this.#catchingUp.forget(connectionId);
    this.#caughtUpTo.forget(connectionId);
    await this.#bindings.unbind(connectionId);
  }

  /**
   * Push one notification to every connection bound to the subscription. Returns how many were
   * reached. A websocket channel has no retry: a client that was away catches up on its next bind.
   */
  async deliver(sub: SubscriptionRecord, type: NotificationType, notes: readonly Notification[]): Promise<number> {
    const bindings = await this.#bindings.bindingsFor(sub.id);
    if (bindings.length === 0) return 0;
    const last = notes[notes.length - 1]?.eventNumber ?? 0;
    let bundleText: string | undefined;
    // Connections per text (the bundle, or the R4 ping): with `sendMany` one call per text.
    const targets = new Map<string, string[]>();
    // A bundle of several events (max-count) partly sent by a catch-up goes out without those.
    const after = (sent: number): string => {
      const rest = notes.filter((n) => n.eventNumber > sent);
      if (rest.length < notes.length) return JSON.stringify(this.#bundle(sub, type, rest, last));
      bundleText ??= JSON.stringify(this.#bundle(sub, type, notes, last));
      return bundleText;
    };
    for (const b of bindings) {
      let text: string;
      if (b.mode === 'r4') {
        if (type !== 'event-notification') continue;
        text = `ping ${sub.id}`;
      } else {
        bundleText ??= JSON.stringify(this.#bundle(sub, type, notes, last));
        text = bundleText;
      }
      const held = this.#catchingUp.get(b.connectionId, sub.id);
      if (held !== undefined) {
        held.push({ text, lastEventNumber: last, after: b.mode === 'r4' ? () => text : after });
        continue;
      }
      if (type === 'event-notification') {
        const sent = this.#caughtUpTo.get(b.connectionId, sub.id) ?? 0;
        if (last <= sent) continue;
        if (b.mode !== 'r4' && (notes[0]?.eventNumber ?? last) <= sent) text = after(sent);
      }
      let ids = targets.get(text);
      if (ids === undefined) {
        ids = [];
        targets.set(text, ids);
      }
      ids.push(b.connectionId);
    }
    let reached = 0;
    const port = this.#port;
    if (port.sendMany !== undefined) {
      const outcomes = await Promise.all([...targets].map(([text, ids]) => port.sendMany?.(ids, text)));
      for (const outcome of outcomes) {
        if (outcome === undefined) continue;
        reached += outcome.sent;
        for (const id of outcome.gone) await this.onClose(id);
      }
    } else {
      // Sends start together (a local socket write completes in the call); one await for all.
      const sends: Promise<SendOutcome>[] = [];
      for (const [text, ids] of targets)
        for (const connectionId of ids) sends.push(this.#sendOrForget({ connectionId }, text));
      const outcomes = await Promise.all(sends);
      reached = outcomes.filter((o) => o === 'sent').length;
      const refused = outcomes.filter((o) => o === 'refused').length;
      this.#metrics.inc('broker_websocket_messages_total', { outcome: 'refused' }, refused);
      // Every live connection refused the push (API Gateway denied or throttled it): nobody has
      // the notification, so it is not delivered. Thrown, it is retried on the delivery schedule
      // like a failed webhook, and dead-letters visibly if the refusals never stop.
      if (reached === 0 && refused > 0) {
        throw new Error(`all ${refused} bound connection(s) refused the message`);
      }
    }
    this.#metrics.inc('broker_websocket_messages_total', { outcome: 'sent' }, reached);
    return reached;
  }

  async #bindWithToken(conn: Connection, msg: Extract<ClientMessage, { kind: 'bind-with-token' }>): Promise<void> {
    let subs: SubscriptionRecord[];
    try {
      const claims = this.#tokens.verify(msg.token, this.#clock.now());
      subs = claims.subscriptions.map((id) => {
        const sub = this.#registry.get(id);
        // Checked again at bind time: the subscription may have been deleted or changed since.
        if (sub === undefined || sub.owner !== claims.owner) throw new BindingTokenError(`unknown subscription ${id}`);
        if (sub.channel.type !== 'websocket')
          throw new BindingTokenError(`Subscription/${id} is not a websocket subscription`);
        if (sub.status === 'off') throw new BindingTokenError(`Subscription/${id} is off`);
        return sub;
      });
    } catch (err) {
      const reason = err instanceof BindingTokenError ? err.message : 'bind failed';
      this.#metrics.inc('broker_websocket_binds_total', { outcome: 'refused' });
      this.#logger.info('websocket bind refused', { connection: conn.id, reason });
      await this.#port.send(
        conn.id,
        msg.json ? JSON.stringify({ type: 'error', payload: { message: reason } }) : `error ${reason}`,
      );
      await this.#port.close(conn.id, CLOSE.bindRefused, reason);
      return;
    }
    for (const sub of subs) {
      const last = msg.lastEventNumbers?.[sub.id] ?? msg.lastEventNumber;
      await this.#bindOne(conn.id, sub, last);
    }
    this.#metrics.inc('broker_websocket_binds_total', { outcome: 'bound' }, subs.length);
  }

  async #bindOne(connectionId: string, sub: SubscriptionRecord, lastSeen: number | undefined): Promise<void> {
    const binding: Binding = { connectionId, subscriptionId: sub.id, mode: 'bundle' };
    // Hold live messages from the moment of binding until the stored range has been sent. The hold
    // is this bind's own: an `unbind` (or a new bind) meanwhile replaces or drops it, and the
    // catch-up stops there.
    const hold: Held[] = [];
    const ours = (): boolean => this.#catchingUp.get(connectionId, sub.id) === hold;
    if (lastSeen !== undefined) this.#catchingUp.set(connectionId, sub.id, hold);
    await this.#bindings.bind(binding);
    this.#port.markBound?.(connectionId, true);
    const current = this.#registry.get(sub.id) ?? sub;
    await this.#sendOrForget(binding, JSON.stringify(this.#bundle(current, 'handshake', [], current.eventsSinceStart)));
    if (lastSeen === undefined) return;
    // Event numbers are the subscription's own: a client that claims more than there are has seen
    // them all, and must not have the next ones skipped as already seen. The count is read afresh
    // before a claim above the cached one is cut (on AWS another function numbers the events).
    const count =
      lastSeen > current.eventsSinceStart
        ? ((await this.#store.getSubscription(sub.id))?.eventsSinceStart ?? current.eventsSinceStart)
        : current.eventsSinceStart;
    let sent = Math.min(lastSeen, count);
    let alive = true;
    try {
      // Page through everything stored after lastSeen (within retention), in order.
      for (;;) {
        const page = await this.#store.notificationsInRange(sub.id, sent + 1, Number.MAX_SAFE_INTEGER, CATCH_UP_PAGE);
        for (const note of page) {
          if (!ours()) return;
          alive =
            (await this.#sendOrForget(
              binding,
              JSON.stringify(this.#bundle(current, 'event-notification', [note], note.eventNumber)),
            )) === 'sent';
          if (!alive) return;
          sent = note.eventNumber;
        }
        if (page.length < CATCH_UP_PAGE) break;
      }
    } finally {
      // Flush what live delivery held meanwhile. The hold stays in place until it is empty, and
      // the high-water mark moves with every send, so a concurrent deliver() either joins the hold
      // or is recognised as already sent: no gap, no duplicate, no reordering. Unbound or bound
      // anew meanwhile: the state is no longer this bind's to touch.
      if (ours()) await this.#flushHold(binding, hold, sent, alive, ours);
    }
  }

  /** Sends what was held, while the hold is still this bind's (`ours`): an unbind or a new bind ends it. */
  async #flushHold(
    binding: Binding,
    held: Held[],
    caughtUp: number,
    open: boolean,
    ours: () => boolean,
  ): Promise<void> {
    const { connectionId, subscriptionId } = binding;
    let sent = caughtUp;
    let alive = open;
    this.#caughtUpTo.set(connectionId, subscriptionId, sent);
    while (alive && held.length > 0) {
      const h = held.shift() as Held;
      if (h.lastEventNumber <= sent) continue;
      alive = (await this.#sendOrForget(binding, h.after(sent))) === 'sent';
      if (!ours()) return;
      if (alive) {
        sent = h.lastEventNumber;
        this.#caughtUpTo.set(connectionId, subscriptionId, sent);
      }
    }
    this.#catchingUp.delete(connectionId, subscriptionId);
    // A connection that went away meanwhile leaves nothing behind.
    if (!alive) {
      this.#caughtUpTo.delete(connectionId, subscriptionId);
    }
  }

  async #bindR4(conn: Connection, id: string): Promise<void> {
    const sub = this.#registry.get(id);
    if (
      conn.apiOwner === undefined ||
      sub === undefined ||
      sub.owner !== conn.apiOwner ||
      sub.channel.type !== 'websocket' ||
      sub.status === 'off'
    ) {
      // Another client's subscription is indistinguishable from none.
      await this.#port.send(
        conn.id,
        `error ${id} unknown subscription or not authorised (connect with Authorization: Bearer <API key>)`,
      );
      await this.#port.close(conn.id, CLOSE.bindRefused, 'bind refused');
      return;
    }
    await this.#bindings.bind({ connectionId: conn.id, subscriptionId: id, mode: 'r4' });
    this.#port.markBound?.(conn.id, true);
    await this.#port.send(conn.id, `bound ${id}`);
  }

  /** Tells the socket layer whether the connection still holds a binding (when it listens: on AWS a look is a query). */
  async #reportBound(connectionId: string): Promise<void> {
    if (this.#port.markBound === undefined) return;
    const bound = (await this.#bindings.bindingsOf(connectionId)).length > 0;
    this.#port.markBound(connectionId, bound);
  }

  async #sendOrForget(b: Pick<Binding, 'connectionId'>, text: string): Promise<SendOutcome> {
    const outcome = await this.#port.send(b.connectionId, text);
    if (outcome === 'gone') await this.onClose(b.connectionId);
    return outcome;
  }

  #bundle(sub: SubscriptionRecord, type: NotificationType, notes: readonly Notification[], count: number) {
    return buildNotificationBundle(
      { ...sub, eventsSinceStart: Math.max(sub.eventsSinceStart, count) },
      type,
      notes,
      sub.channel.content,
      {
        fhirBase: this.#fhirBase,
        newId: () => this.#ids.uuid(),
        timestamp: new Date(this.#clock.now()).toISOString(),
      },
    );
  }
}

/** Per-connection state keyed by subscription, so closing a connection forgets it in one step. */
class PerConnection<V> {
  readonly #byConnection = new Map<string, Map<string, V>>();

  get(connectionId: string, subscriptionId: string): V | undefined {
    return this.#byConnection.get(connectionId)?.get(subscriptionId);
  }

  set(connectionId: string, subscriptionId: string, value: V): void {
    let inner = this.#byConnection.get(connectionId);
    if (inner === undefined) {
      inner = new Map();
      this.#byConnection.set(connectionId, inner);
    }
    inner.set(subscriptionId, value);
  }

  delete(connectionId: string, subscriptionId: string): void {
    const inner = this.#byConnection.get(connectionId);
    inner?.delete(subscriptionId);
    if (inner?.size === 0) this.#byConnection.delete(connectionId);
  }

  forget(connectionId: string): void {
    this.#byConnection.delete(connectionId);
  }
}
