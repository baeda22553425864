/**
 * The WebSocket port: what delivery needs from a socket layer. The local hub (`ws` on the
 * broker's own port) is the first adapter; the API Gateway management API is the second. The
 * core never sees either.
 */

/** `sent`; `gone`: the connection no longer exists (forget it); `refused`: alive but not taking more. */
export type SendOutcome = 'sent' | 'gone' | 'refused';

/** What `sendMany` did: how many were sent, and which connections no longer exist (forget them). */
export interface ManyOutcome {
  readonly sent: number;
  readonly gone: readonly string[];
}

export interface WebSocketPort {
  send(connectionId: string, text: string): Promise<SendOutcome>;
  /**
   * Optional: the same text to many connections as one operation (one IPC message per socket
   * process instead of one per connection). Per connection, ordered with `send`.
   */
  sendMany?(connectionIds: readonly string[], text: string): Promise<ManyOutcome>;
  close(connectionId: string, code: number, reason: string): Promise<void>;
  /**
   * Optional: resolves once the connection has room for more (its send buffer at most half its
   * cap), or is gone. A catch-up waits on it before each message, so it goes at the reader's pace:
   * written in one go, a long one filled the buffer past the cap before the reader could take any.
   * Absent (API Gateway): each send is a request awaited in turn, which is the pace already.
   */
  drained?(connectionId: string): Promise<void>;
  isOpen(connectionId: string): Promise<boolean>;
  /**
   * Optional: the connection now holds at least one binding (`true`) or none (`false`). Anyone may
   * open a socket (the bind is what is authorised), so the local hub closes one that holds no
   * binding for the bind window, counted from its opening or from the loss of its last binding.
   */
  markBound?(connectionId: string, bound: boolean): void;
}

/** `bundle`: backport notification bundles as JSON text; `r4`: the classic R4 `ping <id>`. */
export type BindingMode = 'bundle' | 'r4';

export interface Binding {
  readonly connectionId: string;
  readonly subscriptionId: string;
  readonly mode: BindingMode;
}

/** Which connections are bound to which subscriptions: in memory locally, a table on AWS. */
export interface BindingStore {
  bind(binding: Binding): Promise<void>;
  /** Without `subscriptionId`: every binding of the connection. */
  unbind(connectionId: string, subscriptionId?: string): Promise<void>;
  bindingsFor(subscriptionId: string): Promise<readonly Binding[]>;
  bindingsOf(connectionId: string): Promise<readonly Binding[]>;
}

/** Every connection bound to a subscription refused a push: nobody has it, so it is retried. */
export class WebSocketRefusedError extends Error {}

/** Close codes the broker uses (4000–4999 is the application range of RFC 6455). */
export const CLOSE = {
  normal: 1000,
  goingAway: 1001,
  unsupportedData: 1003,
  policy: 1008,
  tooBig: 1009,
  /** The client did not answer pings: the connection is dead. */
  noPong: 4000,
  /** The client read too slowly: its send buffer passed the cap. */
  slowConsumer: 4001,
  /** More messages than the per-socket rate allows. */
  flood: 4002,
  /** A bind was refused (bad, expired or foreign token or subscription). */
  bindRefused: 4003,
} as const;

export class InMemoryBindings implements BindingStore {
  readonly #bySub = new Map<string, Map<string, Binding>>();
  readonly #byConn = new Map<string, Map<string, Binding>>();

  async bind(b: Binding): Promise<void> {
    nested(this.#bySub, b.subscriptionId).set(b.connectionId, b);
    nested(this.#byConn, b.connectionId).set(b.subscriptionId, b);
  }

  async unbind(connectionId: string, subscriptionId?: string): Promise<void> {
    const mine = this.#byConn.get(connectionId);
    if (mine === undefined) return;
    for (const sub of subscriptionId === undefined ? [...mine.keys()] : [subscriptionId]) {
      mine.delete(sub);
      const conns = this.#bySub.get(sub);
      conns?.delete(connectionId);
      if (conns?.size === 0) this.#bySub.delete(sub);
    }
    if (mine.size === 0) this.#byConn.delete(connectionId);
  }

  async bindingsFor(subscriptionId: string): Promise<readonly Binding[]> {
    return [...(this.#bySub.get(subscriptionId)?.values() ?? [])];
  }

  async bindingsOf(connectionId: string): Promise<readonly Binding[]> {
    return [...(this.#byConn.get(connectionId)?.values() ?? [])];
  }
}

function nested<V>(map: Map<string, Map<string, V>>, key: string): Map<string, V> {
  let inner = map.get(key);
  if (inner === undefined) {
    inner = new Map();
    map.set(key, inner);
  }
  return inner;
}
