import { buildNotificationBundle, type NotificationType } from '../core/notification.js';
import { contentNow } from '../core/subscription.js';
import type { Clock, IdSource, Notification, SubscriptionRecord } from '../core/types.js';
import type { Logger } from '../observability/logger.js';
import type { Metrics } from '../observability/metrics.js';
import type { SubscriptionRegistry } from '../service/subscription-registry.js';
import type { Store } from '../store/store.js';
import { withMedplumDialect } from './medplum-dialect.js';
import {
  type Binding,
  type BindingStore,
  CLOSE,
  type SendOutcome,
  type WebSocketPort,
  WebSocketRefusedError,
} from './websocket-port.js';
import { type ClientMessage, parseClientMessage } from './websocket-protocol.js';
import { type BindingClaims, BindingTokenError, type BindingTokens } from './ws-binding-token.js';

/** The answer to a client's JSON keep-alive, `{"type":"ping"}`. */
const PONG = JSON.stringify({ type: 'pong' });

/**
 * The websocket channel of the backport IG, independent of the socket layer: binding (token or
 * R4 `bind`), handshake, catch-up from stored notifications, and live delivery.
 *
 * Catch-up without gaps or duplicates: while a binding catches up, live messages for it are held;
 * once the stored range is sent, held messages newer than what was sent follow, then it is live.
 * A connection's messages are handled one after another (an `unbind` and the bind after it, sent
 * together, must not interleave). A connection that refuses a push (API Gateway throttled or
 * denied it) is closed, as a slow consumer is: its client binds again with its `lastEventNumber`
 * and catches up, instead of living with a gap it cannot see.
 */

export interface Connection {
  readonly id: string;
  /** Owner proven by `Authorization: Bearer <API key>` at upgrade (needed for R4 `bind`). */
  readonly apiOwner?: string;
  /** Opened on MEDPLUM_WS_PATH: its bundles in Medplum's shape (medplum-dialect.ts). */
  readonly dialect?: 'medplum';
}

/** Stored notifications read per page during a catch-up. */
const CATCH_UP_PAGE = 500;
/** The same for a full-resource subscription: up to 256 KiB each, a few at a time. */
const CATCH_UP_PAGE_WITH_RESOURCES = 16;

/** 1 MiB: the local hub's default send-buffer cap (BROKER_WS_SEND_BUFFER), which the broker passes in. */
const DEFAULT_MAX_HELD_BYTES = 1024 * 1024;

interface Held {
  readonly text: string;
  readonly lastEventNumber: number;
  /** The message without the events at or below `sent` (a bundle of several that a catch-up overlapped). */
  readonly after: (sent: number) => string;
}

/** The live messages held for one binding while it catches up, and their size. */
interface Hold {
  readonly held: Held[];
  bytes: number;
}

export class WebSocketChannel {
  readonly #port: WebSocketPort;
  readonly #dialects: ReturnType<typeof withMedplumDialect>;
  readonly #bindings: BindingStore;
  readonly #registry: Pick<SubscriptionRegistry, 'get' | 'refresh'>;
  readonly #store: Store;
  readonly #tokens: BindingTokens;
  readonly #clock: Clock;
  readonly #ids: IdSource;
  readonly #logger: Logger;
  readonly #metrics: Metrics;
  readonly #fhirBase: string;
  readonly #fullResourceClients: readonly string[] | '*';
  readonly #isClient: (owner: string) => boolean;
  readonly #deleteSubscription: ((sub: SubscriptionRecord) => Promise<void>) | undefined;
  readonly #maxHeldBytes: number;
  /** Connection → subscription → messages held while that binding catches up. */
  readonly #catchingUp = new PerConnection<Hold>();
  /** Connection → subscription → highest event number its catch-up sent (later live copies are skipped). */
  readonly #caughtUpTo = new PerConnection<number>();
  /** Connection → the end of its chain of messages: one is handled after the other. Idle or closed: no entry. */
  readonly #inbox = new Map<string, Promise<void>>();
  /** Sockets one API client may hold bound (0: no cap). */
  readonly #maxSocketsPerClient: number;
  /** API client → open connections that bound one of its subscriptions (until they close). */
  readonly #socketsOf = new Map<string, Set<string>>();
  /** Connection → the API clients it counts for. */
  readonly #clientsOf = new Map<string, Set<string>>();

  constructor(deps: {
    port: WebSocketPort;
    bindings: BindingStore;
    registry: Pick<SubscriptionRegistry, 'get' | 'refresh'>;
    store: Store;
    tokens: BindingTokens;
    clock: Clock;
    ids: IdSource;
    logger: Logger;
    metrics: Metrics;
    fhirBase: string;
    /** `BROKER_FULL_RESOURCE_CLIENTS`: a full-resource subscription of another client is sent id-only. */
    fullResourceClients?: readonly string[] | '*';
    /**
     * Whether a token's owner is still a configured API client: a token outlives the removal of
     * its client from BROKER_API_KEYS (it is valid for minutes). Absent: every owner is.
     */
    isClient?: (owner: string) => boolean;
    /**
     * Deletes a subscription Medplum's client made for one socket (see `#releaseMedplum`). Absent:
     * none is deleted (on AWS no socket comes in on Medplum's path).
     */
    deleteSubscription?: (sub: SubscriptionRecord) => Promise<void>;
    /**
     * Bytes of live messages held for one connection while it catches up: past this it is not
     * keeping up, and is closed as a slow consumer (4001), as the local hub closes one whose send
     * buffer passes its cap (BROKER_WS_SEND_BUFFER, which the broker passes here).
     */
    maxHeldBytes?: number;
    /**
     * Open connections that may hold bindings of one API client (BROKER_WS_MAX_PER_CLIENT): a
     * binding token binds any number of sockets, so without it one client could fill the socket
     * cap and lock every other out. A connection counts from its first binding of the client's
     * until it closes. Absent or 0: no cap (on AWS, API Gateway holds the sockets).
     */
    maxSocketsPerClient?: number;
  }) {
    this.#dialects = withMedplumDialect(deps.port);
    this.#port = this.#dialects.port;
    this.#bindings = deps.bindings;
    this.#registry = deps.registry;
    this.#store = deps.store;
    this.#tokens = deps.tokens;
    this.#clock = deps.clock;
    this.#ids = deps.ids;
    this.#logger = deps.logger;
    this.#metrics = deps.metrics;
    this.#fhirBase = deps.fhirBase;
    this.#fullResourceClients = deps.fullResourceClients ?? [];
    this.#isClient = deps.isClient ?? (() => true);
    this.#deleteSubscription = deps.deleteSubscription;
    this.#maxHeldBytes = deps.maxHeldBytes ?? DEFAULT_MAX_HELD_BYTES;
    this.#maxSocketsPerClient = deps.maxSocketsPerClient ?? 0;
  }

  /**
   * Counts the connection for `owner`; false when that would pass the client's cap (nothing
   * counted). No cap, nothing counted: on AWS a socket's close reaches another container, which
   * would never forget it here.
   */
  #countFor(connectionId: string, owner: string): boolean {
    if (this.#maxSocketsPerClient === 0) return true;
    const sockets = this.#socketsOf.get(owner) ?? new Set<string>();
    if (sockets.has(connectionId)) return true;
    if (sockets.size >= this.#maxSocketsPerClient) return false;
    sockets.add(connectionId);
    this.#socketsOf.set(owner, sockets);
    const clients = this.#clientsOf.get(connectionId) ?? new Set<string>();
    clients.add(owner);
    this.#clientsOf.set(connectionId, clients);
    return true;
  }

  #uncount(connectionId: string): void {
    for (const owner of this.#clientsOf.get(connectionId) ?? []) {
      const sockets = this.#socketsOf.get(owner);
      sockets?.delete(connectionId);
      if (sockets?.size === 0) this.#socketsOf.delete(owner);
    }
    this.#clientsOf.delete(connectionId);
  }

  /** The refusal of a bind past the client's cap, or undefined when it may bind. */
  #overCap(connectionId: string, owner: string): string | undefined {
    if (this.#countFor(connectionId, owner)) return undefined;
    this.#metrics.inc('broker_websocket_refused_total', { reason: 'max-per-client' });
    return `too many open sockets for this API client (at most ${this.#maxSocketsPerClient}); close some and bind again`;
  }

  /**
   * One text message from a client. Protocol errors close only that connection. A connection's
   * messages are handled in the order they came, each after the one before has finished: handled
   * side by side, an `unbind` resuming after its `await` dropped the hold of the bind that followed
   * it, whose catch-up then sent nothing. A failed message fails only its own promise.
   */
  onMessage(conn: Connection, text: string): Promise<void> {
    if (conn.dialect === 'medplum') this.#dialects.mark(conn.id);
    const msg = parseClientMessage(text);
    // An `unbind` stops a catch-up (or a flush of held events) under way at once, rather than wait
    // its turn behind it: the catch-up's hold is swapped for one nobody sends, so the catch-up ends
    // at its next message and live events meanwhile wait there, dropped when the unbind's turn
    // comes. A bind that came after it runs after it, with a hold of its own.
    if (msg.kind === 'unbind') this.#catchingUp.replace(conn.id, msg.subscriptionId, () => ({ held: [], bytes: 0 }));
    // A keep-alive is answered at once, not behind a catch-up under way (it would seem gone).
    if (msg.kind === 'ping') return this.#port.send(conn.id, PONG).then(() => undefined);
    const handled = (this.#inbox.get(conn.id) ?? Promise.resolve()).then(() => this.#handle(conn, msg));
    const settled = handled.then(
      () => undefined,
      () => undefined,
    );
    this.#inbox.set(conn.id, settled);
    // Nothing waits behind the last message: forget the chain (and the connection with it).
    void settled.then(() => {
      if (this.#inbox.get(conn.id) === settled) this.#inbox.delete(conn.id);
    });
    return handled;
  }

  #dropHolds(connectionId: string, subscriptionId: string | undefined): void {
    if (subscriptionId === undefined) {
      this.#catchingUp.forget(connectionId);
      this.#caughtUpTo.forget(connectionId);
    } else {
      this.#catchingUp.delete(connectionId, subscriptionId);
      this.#caughtUpTo.delete(connectionId, subscriptionId);
    }
  }

  async #handle(conn: Connection, msg: ClientMessage): Promise<void> {
    switch (msg.kind) {
      case 'bind-with-token':
        return this.#bindWithToken(conn, msg);
      case 'unbind':
        await this.#bindings.unbind(conn.id, msg.subscriptionId);
        // Its last binding gone, the socket has the bind window again to bind, then is closed: an
        // `unbind` is no way to hold a socket without a binding (a bare one is valid with none).
        await this.#reportBound(conn.id);
        this.#dropHolds(conn.id, msg.subscriptionId);
        await this.#port.send(
          conn.id,
          msg.json
            ? JSON.stringify({ type: 'unbound', payload: { subscription: msg.subscriptionId ?? null } })
            : `unbound${msg.subscriptionId === undefined ? '' : ` ${msg.subscriptionId}`}`,
        );
        return;
      case 'bind':
        return this.#bindR4(conn, msg.subscriptionId);
      case 'unbind-from-token':
        return this.#unbindToken(conn, msg.token);
      case 'ping':
        return;
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
    const why = unbindable(this.#registry.get(id));
    if (why === undefined) return;
    for (const b of await this.#bindings.bindingsFor(id)) await this.#letGo(b, why);
  }

  async onClose(connectionId: string): Promise<void> {
    const medplum = this.#dialects.has(connectionId);
    this.#dialects.forget(connectionId);
    this.#uncount(connectionId);
    this.#catchingUp.forget(connectionId);
    this.#caughtUpTo.forget(connectionId);
    this.#inbox.delete(connectionId);
    const held = medplum ? await this.#bindings.bindingsOf(connectionId) : [];
    await this.#bindings.unbind(connectionId);
    await this.#releaseMedplum(held.map((b) => b.subscriptionId));
  }

  /**
   * Medplum's client makes a classic websocket Subscription for each criteria every time its
   * socket opens, and lets go of it (`unbind-from-token`, or the socket closing) without deleting
   * it: Medplum's server keeps such subscriptions for the socket's life only. So does this one:
   * a classic websocket subscription let go of on Medplum's path that no socket holds any more is
   * deleted, or every reconnect would leave one more matching every change, up to the client's
   * quota (then it could create none).
   */
  async #releaseMedplum(ids: readonly string[]): Promise<void> {
    const remove = this.#deleteSubscription;
    if (remove === undefined) return;
    for (const id of ids) {
      const sub = this.#registry.get(id);
      if (sub?.kind !== 'classic' || sub.channel.type !== 'websocket') continue;
      if ((await this.#bindings.bindingsFor(id)).length > 0) continue;
      try {
        await remove(sub);
        this.#logger.info('medplum websocket subscription let go: deleted', { subscription: id, owner: sub.owner });
      } catch (err) {
        this.#logger.warn('medplum websocket subscription not deleted', { subscription: id, err: err as Error });
      }
    }
  }

  /**
   * Push one notification to every connection bound to the subscription. Returns how many were
   * reached. A websocket channel has no retry: a client that was away catches up on its next bind.
   */
  async deliver(sub: SubscriptionRecord, type: NotificationType, notes: readonly Notification[]): Promise<number> {
    const bindings = await this.#bindings.bindingsFor(sub.id);
    if (bindings.length === 0) return 0;
    const last = notes[notes.length - 1]?.eventNumber ?? 0;
    // Connections per text (the bundle, or the R4 ping): with `sendMany` one call per text.
    const targets = new Map<string, string[]>();
    // Catching up while more live messages were held for them than they may have waiting: their
    // reader is slower than the subscription's events (a catch-up goes at the reader's pace).
    const behind: string[] = [];
    /**
     * The bundle as `view` has it, built once; `after`: a bundle of several events (max-count)
     * partly sent by a catch-up goes out without those.
     */
    const textsOf = (view: SubscriptionRecord) => {
      let whole: string | undefined;
      const full = (): string => {
        whole ??= JSON.stringify(this.#bundle(view, type, notes, last));
        return whole;
      };
      const after = (sent: number): string => {
        const rest = notes.filter((n) => n.eventNumber > sent);
        return rest.length < notes.length ? JSON.stringify(this.#bundle(view, type, rest, last)) : full();
      };
      return { full, after };
    };
    const plain = textsOf(sub);
    // On Medplum's path a notification names its focus, as Medplum's server's do (see `namingFocus`);
    // built only when a socket there is bound.
    let medplum: typeof plain | undefined;
    const textsFor = (connectionId: string): typeof plain => {
      if (!this.#dialects.has(connectionId)) return plain;
      if (medplum === undefined) {
        const view = namingFocus(sub);
        medplum = view === sub ? plain : textsOf(view);
      }
      return medplum;
    };
    for (const b of bindings) {
      let text: string;
      const texts = textsFor(b.connectionId);
      const after = texts.after;
      if (b.mode === 'r4') {
        if (type !== 'event-notification') continue;
        text = `ping ${sub.id}`;
      } else {
        text = texts.full();
      }
      const hold = this.#catchingUp.get(b.connectionId, sub.id);
      if (hold !== undefined) {
        hold.bytes += text.length;
        if (hold.bytes > this.#maxHeldBytes) {
          this.#catchingUp.delete(b.connectionId, sub.id);
          behind.push(b.connectionId);
        } else hold.held.push({ text, lastEventNumber: last, after: b.mode === 'r4' ? () => text : after });
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
    for (const id of behind) await this.#closeLagging(id, 'slow-consumer');
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
      const ids = [...targets].flatMap(([text, of]) => of.map((connectionId) => ({ connectionId, text })));
      const outcomes = await Promise.all(ids.map(({ connectionId, text }) => this.#sendOrForget(connectionId, text)));
      reached = outcomes.filter((o) => o === 'sent').length;
      const refused = ids.filter((_, i) => outcomes[i] === 'refused').map((t) => t.connectionId);
      this.#metrics.inc('broker_websocket_messages_total', { outcome: 'refused' }, refused.length);
      // Every live connection refused the push (API Gateway denied or throttled it): nobody has
      // the notification, so it is not delivered. Thrown, it is retried on the delivery schedule
      // like a failed webhook, and dead-letters visibly if the refusals never stop.
      if (reached === 0 && refused.length > 0) {
        throw new WebSocketRefusedError(`all ${refused.length} bound connection(s) refused the message`);
      }
      // Others have it (a retry would send it to them again): those that refused it are closed,
      // and catch up when their clients bind again.
      for (const id of refused) await this.#closeLagging(id, 'refused');
    }
    this.#metrics.inc('broker_websocket_messages_total', { outcome: 'sent' }, reached);
    return reached;
  }

  async #bindWithToken(conn: Connection, msg: Extract<ClientMessage, { kind: 'bind-with-token' }>): Promise<void> {
    let claims: BindingClaims;
    try {
      claims = this.#tokens.verify(msg.token, this.#clock.now());
    } catch (err) {
      // Anyone can send a token: refused ones are counted, and logged only at debug (one line
      // each would let a client that reconnects in a loop fill the log). Any other error is a fault.
      if (err instanceof BindingTokenError) return this.#refuseBind(conn, msg.json, err.message, 'debug');
      this.#logger.error('websocket bind-token check failed', { connection: conn.id, err: err as Error });
      return this.#refuseBind(conn, msg.json, 'bind failed');
    }
    const ids = claims.subscriptions;
    // A client removed from BROKER_API_KEYS binds nothing with the tokens it still holds; it is
    // told what it would be told of a subscription that does not exist (no existence leak).
    if (!this.#isClient(claims.owner)) return this.#refuseBind(conn, msg.json, `unknown subscription ${ids[0] ?? ''}`);
    // Checked again at bind time: the subscription may have been created, deleted or changed since
    // the registry last read it (on AWS another function writes them; this one re-reads every 5 s).
    await this.#readAfresh(ids, claims.owner);
    const subs: SubscriptionRecord[] = [];
    for (const id of ids) {
      const sub = this.#registry.get(id);
      const reason = refusal(sub, id, claims.owner);
      if (sub === undefined || reason !== undefined) return this.#refuseBind(conn, msg.json, reason ?? 'bind failed');
      subs.push(sub);
    }
    const over = this.#overCap(conn.id, claims.owner);
    if (over !== undefined) return this.#refuseBind(conn, msg.json, over);
    let bound = 0;
    for (const sub of subs) {
      const last = msg.lastEventNumbers?.[sub.id] ?? msg.lastEventNumber;
      if (await this.#bindOne(conn.id, sub, last)) bound++;
    }
    this.#metrics.inc('broker_websocket_binds_total', { outcome: 'bound' }, bound);
  }

  /**
   * Medplum's `unbind-from-token`: this socket's bindings of the subscriptions the token names (one
   * this broker signed, expired or not: a socket may always let go of its own), each answered as an
   * `unbind` of it is. A token it did not sign is a protocol error.
   */
  async #unbindToken(conn: Connection, token: string): Promise<void> {
    let ids: readonly string[];
    try {
      ids = this.#tokens.verify(token, this.#clock.now(), true).subscriptions;
    } catch (err) {
      if (!(err instanceof BindingTokenError)) throw err;
      this.#metrics.inc('broker_websocket_protocol_errors_total');
      await this.#port.close(conn.id, CLOSE.policy, err.message);
      return;
    }
    for (const id of ids) await this.#handle(conn, { kind: 'unbind', json: true, subscriptionId: id });
    if (this.#dialects.has(conn.id)) await this.#releaseMedplum(ids);
  }

  async #refuseBind(conn: Connection, json: boolean, reason: string, level: 'info' | 'debug' = 'info'): Promise<void> {
    this.#metrics.inc('broker_websocket_binds_total', { outcome: 'refused' });
    this.#logger[level]('websocket bind refused', { connection: conn.id, reason });
    await this.#port.send(
      conn.id,
      json ? JSON.stringify({ type: 'error', payload: { message: reason } }) : `error ${reason}`,
    );
    await this.#closeIfUnbound(conn.id, reason);
  }

  /**
   * After a refused bind: a socket with no binding is closed (4003: binding again as it did cannot
   * help); one that has bindings keeps them, and stays open (the IG's client binds serially over one
   * socket, and renews a token before it expires: one refused renewal must not cost it the rest).
   */
  async #closeIfUnbound(connectionId: string, reason: string): Promise<void> {
    if ((await this.#bindings.bindingsOf(connectionId)).length > 0) return;
    await this.#port.close(connectionId, CLOSE.bindRefused, reason);
  }

  /** Binds, sends the handshake and catches up; false when the subscription went meanwhile. */
  async #bindOne(connectionId: string, sub: SubscriptionRecord, lastSeen: number | undefined): Promise<boolean> {
    const binding: Binding = { connectionId, subscriptionId: sub.id, mode: 'bundle' };
    // Hold live messages from the moment of binding until the stored range has been sent. The hold
    // is this bind's own: the subscription going, the connection closing or falling too far behind
    // drops it meanwhile, and the catch-up stops there (an `unbind` or a new bind waits its turn).
    const hold: Hold = { held: [], bytes: 0 };
    const ours = (): boolean => this.#catchingUp.get(connectionId, sub.id) === hold;
    if (lastSeen !== undefined) this.#catchingUp.set(connectionId, sub.id, hold);
    const current = await this.#bindIfStill(binding);
    if (current === undefined) return false;
    const handshake = JSON.stringify(this.#bundle(current, 'handshake', [], current.eventsSinceStart));
    // On Medplum's path a notification names its focus, as Medplum's server's do (see `namingFocus`).
    const view = this.#dialects.has(connectionId) ? namingFocus(current) : current;
    if (!(await this.#push(connectionId, handshake))) {
      if (ours()) this.#catchingUp.delete(connectionId, sub.id);
      return true;
    }
    if (lastSeen === undefined) return true;
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
      // Page through everything stored after lastSeen (within retention), in order. Each send
      // waits until the socket has room (`drained`): written in one go, a long catch-up filled the
      // send buffer past its cap before the reader could take any of it, however fast it read.
      const pageSize = current.channel.content === 'full-resource' ? CATCH_UP_PAGE_WITH_RESOURCES : CATCH_UP_PAGE;
      for (;;) {
        const page = await this.#store.notificationsInRange(sub.id, sent + 1, Number.MAX_SAFE_INTEGER, pageSize);
        for (const note of page) {
          await this.#port.drained?.(connectionId);
          if (!ours()) return true;
          alive = await this.#push(
            connectionId,
            JSON.stringify(this.#bundle(view, 'event-notification', [note], note.eventNumber)),
          );
          if (!alive) return true;
          sent = note.eventNumber;
          // Held copies of what the catch-up has now sent are no longer owed (nor counted as held).
          while ((hold.held[0]?.lastEventNumber ?? Number.POSITIVE_INFINITY) <= sent)
            hold.bytes -= (hold.held.shift() as Held).text.length;
        }
        if (page.length < pageSize) break;
      }
    } finally {
      // Flush what live delivery held meanwhile. The hold stays in place until it is empty, and
      // the high-water mark moves with every send, so a concurrent deliver() either joins the hold
      // or is recognised as already sent: no gap, no duplicate, no reordering. Hold dropped
      // meanwhile: the state is no longer this bind's to touch.
      if (ours()) await this.#flushHold(binding, hold, sent, alive, ours);
    }
    return true;
  }

  /**
   * Writes the binding, then reads the registry again: a subscription deleted, turned off or moved
   * while the bind was under way (a token for several binds them one after another; `subscriptionChanged`
   * may have run before this binding existed) is let go as `subscriptionChanged` does, not left bound.
   * The subscription as it is now, or undefined when it was let go.
   */
  async #bindIfStill(binding: Binding): Promise<SubscriptionRecord | undefined> {
    await this.#bindings.bind(binding);
    this.#port.markBound?.(binding.connectionId, true);
    const current = this.#registry.get(binding.subscriptionId);
    const why = unbindable(current);
    if (current !== undefined && why === undefined) return current;
    await this.#letGo(binding, why ?? 'deleted');
    return undefined;
  }

  /** Sends what was held, while the hold is still this bind's (`ours`): whatever drops it ends the flush. */
  async #flushHold(binding: Binding, hold: Hold, caughtUp: number, open: boolean, ours: () => boolean): Promise<void> {
    const { connectionId, subscriptionId } = binding;
    const { held } = hold;
    let sent = caughtUp;
    let alive = open;
    this.#caughtUpTo.set(connectionId, subscriptionId, sent);
    while (alive && held.length > 0) {
      const h = held.shift() as Held;
      hold.bytes -= h.text.length;
      if (h.lastEventNumber <= sent) continue;
      // What is still held meanwhile stays behind this one (deliver() adds to the hold).
      await this.#port.drained?.(connectionId);
      if (!ours()) return;
      alive = await this.#push(connectionId, h.after(sent));
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
    const owner = conn.apiOwner !== undefined && this.#isClient(conn.apiOwner) ? conn.apiOwner : undefined;
    if (owner !== undefined) await this.#readAfresh([id], owner);
    if (owner === undefined || refusal(this.#registry.get(id), id, owner) !== undefined) {
      // Another client's subscription is indistinguishable from none.
      await this.#port.send(
        conn.id,
        `error ${id} unknown subscription or not authorised (connect with Authorization: Bearer <API key>)`,
      );
      await this.#closeIfUnbound(conn.id, 'bind refused');
      return;
    }
    const over = this.#overCap(conn.id, owner);
    if (over !== undefined) {
      await this.#port.send(conn.id, `error ${id} ${over}`);
      await this.#closeIfUnbound(conn.id, 'bind refused');
      return;
    }
    if ((await this.#bindIfStill({ connectionId: conn.id, subscriptionId: id, mode: 'r4' })) === undefined) return;
    await this.#port.send(conn.id, `bound ${id}`);
  }

  /**
   * Before a bind decides, the subscriptions it names are read again where the registry may be
   * behind the store: on a store shared by instances every one (one deleted or turned off elsewhere
   * a moment ago must not bind, one created a moment ago must); on its own store only one the
   * registry lacks or would refuse.
   */
  async #readAfresh(ids: readonly string[], owner: string): Promise<void> {
    const doubtful =
      this.#store.sharedByInstances === true
        ? ids
        : ids.filter((id) => refusal(this.#registry.get(id), id, owner) !== undefined);
    if (doubtful.length > 0) await this.#registry.refresh(doubtful);
  }

  /**
   * The binding's subscription is gone, off or no longer a websocket one: unbind it and tell the
   * socket (`unbound <id>`, or its JSON form with the reason for bundle clients); a socket left
   * with no binding is closed (4003).
   */
  async #letGo(b: Binding, why: string): Promise<void> {
    const id = b.subscriptionId;
    await this.#bindings.unbind(b.connectionId, id);
    this.#catchingUp.delete(b.connectionId, id);
    this.#caughtUpTo.delete(b.connectionId, id);
    const text =
      b.mode === 'r4'
        ? `unbound ${id}`
        : JSON.stringify({ type: 'unbound', payload: { subscription: id, reason: `Subscription/${id} is ${why}` } });
    if ((await this.#port.send(b.connectionId, text)) !== 'sent') return;
    const bound = (await this.#bindings.bindingsOf(b.connectionId)).length > 0;
    // The socket layer hears it too: should the close below not happen, its bind window does.
    this.#port.markBound?.(b.connectionId, bound);
    if (!bound) await this.#port.close(b.connectionId, CLOSE.bindRefused, `Subscription/${id} is ${why}`);
  }

  /** Tells the socket layer whether the connection still holds a binding (when it listens: on AWS a look is a query). */
  async #reportBound(connectionId: string): Promise<void> {
    if (this.#port.markBound === undefined) return;
    const bound = (await this.#bindings.bindingsOf(connectionId)).length > 0;
    this.#port.markBound(connectionId, bound);
  }

  /**
   * One message of a bind (handshake, catch-up, what was held): whether the connection took it.
   * Gone: forgotten. Refused: closed, so that its client binds again and catches up from there.
   */
  async #push(connectionId: string, text: string): Promise<boolean> {
    const outcome = await this.#sendOrForget(connectionId, text);
    if (outcome === 'refused') await this.#closeLagging(connectionId, 'refused');
    return outcome === 'sent';
  }

  async #sendOrForget(connectionId: string, text: string): Promise<SendOutcome> {
    const outcome = await this.#port.send(connectionId, text);
    if (outcome === 'gone') await this.onClose(connectionId);
    return outcome;
  }

  /**
   * A connection that missed a message it was owed (it refused the push, or more was held for it
   * than it may have waiting) is closed (4001), as the local hub closes a slow consumer: its
   * client reconnects and binds with its `lastEventNumber`, and the catch-up fills the gap. Not
   * closed (the management API refused that too): it stays bound, and the next event's number
   * shows the client the gap.
   */
  async #closeLagging(connectionId: string, reason: 'refused' | 'slow-consumer'): Promise<void> {
    this.#metrics.inc('broker_websocket_closed_total', { reason });
    this.#logger.warn('websocket closed: it missed a message', { connection: connectionId, reason });
    try {
      await this.#port.close(
        connectionId,
        CLOSE.slowConsumer,
        reason === 'refused'
          ? 'a message was refused: bind again with lastEventNumber'
          : 'slow consumer: held too much',
      );
    } catch (err) {
      this.#logger.warn('websocket close failed', { connection: connectionId, err: err as Error });
      return;
    }
    await this.onClose(connectionId);
  }

  #bundle(sub: SubscriptionRecord, type: NotificationType, notes: readonly Notification[], count: number) {
    return buildNotificationBundle(
      { ...sub, eventsSinceStart: Math.max(sub.eventsSinceStart, count) },
      type,
      notes,
      contentNow(sub, this.#fullResourceClients),
      {
        fhirBase: this.#fhirBase,
        newId: () => this.#ids.uuid(),
        timestamp: new Date(this.#clock.now()).toISOString(),
      },
    );
  }
}

/**
 * `sub` with `id-only` content where it has `empty` (else `sub` itself): what a socket on Medplum's
 * path is sent. Its client makes classic websocket subscriptions (no payload: R4's empty content)
 * and reads the change from the notification, which Medplum's server fills.
 */
function namingFocus(sub: SubscriptionRecord): SubscriptionRecord {
  return sub.channel.content === 'empty' ? { ...sub, channel: { ...sub.channel, content: 'id-only' } } : sub;
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

  /** Each value the connection has (only `subscriptionId`'s when given) replaced by a fresh one. */
  replace(connectionId: string, subscriptionId: string | undefined, fresh: () => V): void {
    const inner = this.#byConnection.get(connectionId);
    if (inner === undefined) return;
    for (const key of inner.keys()) if (subscriptionId === undefined || key === subscriptionId) inner.set(key, fresh());
  }
}

/** Why a bind of `sub` is refused, for a client that is `owner`; undefined when it may bind. */
function refusal(sub: SubscriptionRecord | undefined, id: string, owner: string): string | undefined {
  // Another client's subscription is indistinguishable from none.
  if (sub === undefined || sub.owner !== owner) return `unknown subscription ${id}`;
  if (sub.channel.type !== 'websocket') return `Subscription/${id} is not a websocket subscription`;
  if (sub.status === 'off') return `Subscription/${id} is off`;
  return undefined;
}

/** Why sockets bound to `sub` are let go (deleted, off, another channel); undefined when they stay. */
function unbindable(sub: SubscriptionRecord | undefined): string | undefined {
  if (sub === undefined) return 'deleted';
  if (sub.status === 'off') return 'off';
  if (sub.channel.type !== 'websocket') return 'no longer a websocket subscription';
  return undefined;
}
