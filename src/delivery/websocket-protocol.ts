/**
 * The client → broker WebSocket messages: the backport IG's `bind-with-token` (text and JSON
 * forms), `unbind`, and the classic R4 `bind <id>`; and, as Medplum's client sends them, a JSON
 * keep-alive `{"type":"ping"}` (answered `{"type":"pong"}`) and `unbind-from-token` (the
 * subscriptions a token names). Parsing is pure and fails closed.
 */

export type ClientMessage =
  | {
      readonly kind: 'bind-with-token';
      readonly token: string;
      readonly json: boolean;
      /** Catch-up: the last event number the client saw, for every bound subscription. */
      readonly lastEventNumber?: number;
      /** Catch-up per subscription id. */
      readonly lastEventNumbers?: Readonly<Record<string, number>>;
    }
  | { readonly kind: 'unbind'; readonly json: boolean; readonly subscriptionId?: string }
  | { readonly kind: 'unbind-from-token'; readonly token: string }
  | { readonly kind: 'ping' }
  | { readonly kind: 'bind'; readonly subscriptionId: string }
  | { readonly kind: 'invalid'; readonly reason: string };

const ID = /^[A-Za-z0-9\-.]{1,64}$/;
// 8,192: a token naming the most subscriptions one may (100, fhir-routes.ts) is ~5,300 characters.
const TOKEN = /^[A-Za-z0-9\-._~+/=]{1,8192}$/;

export function parseClientMessage(text: string): ClientMessage {
  const trimmed = text.trim();
  if (trimmed.startsWith('{')) return parseJson(trimmed);
  const [command, ...args] = trimmed.split(/\s+/);
  switch (command) {
    case 'bind-with-token': {
      const [token, last] = args;
      if (token === undefined || !TOKEN.test(token) || args.length > 2) {
        return { kind: 'invalid', reason: 'usage: bind-with-token <token> [<last event number>]' };
      }
      const n = last === undefined ? undefined : eventNumber(last);
      if (last !== undefined && n === undefined)
        return { kind: 'invalid', reason: 'the last event number must be an integer' };
      return { kind: 'bind-with-token', token, json: false, ...(n === undefined ? {} : { lastEventNumber: n }) };
    }
    case 'unbind': {
      const [id] = args;
      if (args.length > 1 || (id !== undefined && !ID.test(id)))
        return { kind: 'invalid', reason: 'usage: unbind [<id>]' };
      return { kind: 'unbind', json: false, ...(id === undefined ? {} : { subscriptionId: id }) };
    }
    case 'bind': {
      const [id] = args;
      if (id === undefined || args.length > 1 || !ID.test(id)) return { kind: 'invalid', reason: 'usage: bind <id>' };
      return { kind: 'bind', subscriptionId: id };
    }
    default:
      return { kind: 'invalid', reason: `unknown command ${JSON.stringify((command ?? '').slice(0, 32))}` };
  }
}

function parseJson(text: string): ClientMessage {
  let msg: unknown;
  try {
    msg = JSON.parse(text);
  } catch {
    return { kind: 'invalid', reason: 'malformed JSON' };
  }
  if (typeof msg !== 'object' || msg === null) return { kind: 'invalid', reason: 'a JSON message must be an object' };
  const { type, payload } = msg as { type?: unknown; payload?: unknown };
  const p = (typeof payload === 'object' && payload !== null ? payload : {}) as Record<string, unknown>;
  if (type === 'bind-with-token') {
    if (typeof p.token !== 'string' || !TOKEN.test(p.token))
      return { kind: 'invalid', reason: 'payload.token is required' };
    const last = p.lastEventNumber === undefined ? undefined : eventNumber(p.lastEventNumber);
    if (p.lastEventNumber !== undefined && last === undefined) {
      return { kind: 'invalid', reason: 'payload.lastEventNumber must be an integer' };
    }
    let perSub: Record<string, number> | undefined;
    if (p.lastEventNumbers !== undefined) {
      if (typeof p.lastEventNumbers !== 'object' || p.lastEventNumbers === null) {
        return { kind: 'invalid', reason: 'payload.lastEventNumbers must map subscription ids to integers' };
      }
      perSub = {};
      for (const [id, v] of Object.entries(p.lastEventNumbers)) {
        const n = eventNumber(v);
        if (!ID.test(id) || n === undefined) {
          return { kind: 'invalid', reason: 'payload.lastEventNumbers must map subscription ids to integers' };
        }
        perSub[id] = n;
      }
    }
    return {
      kind: 'bind-with-token',
      token: p.token,
      json: true,
      ...(last === undefined ? {} : { lastEventNumber: last }),
      ...(perSub === undefined ? {} : { lastEventNumbers: perSub }),
    };
  }
  if (type === 'ping') return { kind: 'ping' };
  if (type === 'unbind-from-token') {
    if (typeof p.token !== 'string' || !TOKEN.test(p.token))
      return { kind: 'invalid', reason: 'payload.token is required' };
    return { kind: 'unbind-from-token', token: p.token };
  }
  if (type === 'unbind') {
    const id = p.subscription;
    if (id !== undefined && (typeof id !== 'string' || !ID.test(id)))
      return { kind: 'invalid', reason: 'payload.subscription must be an id' };
    return { kind: 'unbind', json: true, ...(id === undefined ? {} : { subscriptionId: id }) };
  }
  return { kind: 'invalid', reason: `unknown message type ${JSON.stringify(String(type).slice(0, 32))}` };
}

function eventNumber(v: unknown): number | undefined {
  const n = typeof v === 'string' && /^\d{1,15}$/.test(v) ? Number(v) : v;
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0 ? n : undefined;
}
