import type { TableNames } from '../../src/store/dynamodb/tables.js';

/**
 * What each Lambda function may reach, read off the code paths of its entry point (src/aws/) and
 * proven against the real handlers by test/aws-iam.test.ts: every DynamoDB request they send there
 * must be allowed by the synthesized role, and the role must allow nothing they did not use.
 * Every function also reads the credentials secret at start-up; that grant is not listed here.
 */

export type TableRole = keyof TableNames;
/** Item-level data access as CDK's `grantReadData` / `grantWriteData` / `grantReadWriteData` give it, indexes included. */
export type DataAccess = 'read' | 'write' | 'read-write';
export type FunctionName = 'events' | 'api' | 'dispatcher' | 'wsConnect' | 'wsDisconnect' | 'wsMessage';

export interface FunctionAccess {
  /** The tables the function reaches; one not named is out of its reach. */
  readonly tables: Readonly<Partial<Record<TableRole, DataAccess>>>;
  /** PutEvents on the broker's bus: it changes subscription state or dead-letters, and so publishes lifecycle events. */
  readonly putEvents: boolean;
  /** PostToConnection / GetConnection / DeleteConnection on the WebSocket stage. */
  readonly manageConnections: boolean;
}

/**
 * Every cold start (createAwsBroker in src/aws/aws-broker.ts) runs `ensureTypeIndex`: a read of the
 * marker in `subscription-types`, and, on tables whose type index was never built (the first start
 * after an upgrade), a scan of `subscriptions` and writes to `subscription-types`. Whichever
 * function starts first builds it, so every function needs this, the WebSocket ones included.
 */
const START_UP: FunctionAccess['tables'] = { subscriptions: 'read', subscriptionTypes: 'read-write' };

const EVERY_TABLE: FunctionAccess['tables'] = {
  subscriptions: 'read-write',
  notifications: 'read-write',
  eventIds: 'read-write',
  connections: 'read-write',
  subscriptionTypes: 'read-write',
};

export const FUNCTION_ACCESS: Readonly<Record<FunctionName, FunctionAccess>> = {
  // Dedupe (event-ids), numbering and queueing (subscriptions, notifications), matching (the type
  // index), delivery (connections for WebSocket subscriptions, unbinding gone ones), and the status
  // changes a delivery causes (410 → off, dead letters → error).
  events: { tables: EVERY_TABLE, putEvents: true, manageConnections: true },
  // Subscription CRUD and operations, `POST /events` (the same ingest as the events function), and
  // deleting a WebSocket subscription unbinds and closes its sockets.
  api: { tables: EVERY_TABLE, putEvents: true, manageConnections: true },
  // Owed handshakes, pending and retried deliveries, heartbeats, and the purge of old notifications
  // and event ids.
  dispatcher: { tables: EVERY_TABLE, putEvents: true, manageConnections: true },
  // `$connect` writes the connection item; it reads nothing else after start-up.
  wsConnect: { tables: merge(START_UP, { connections: 'write' }), putEvents: false, manageConnections: false },
  // `$disconnect` queries the connection's items and deletes them.
  wsDisconnect: { tables: merge(START_UP, { connections: 'read-write' }), putEvents: false, manageConnections: false },
  // A bind reads the subscriptions (the registry) and the stored notifications it replays, and
  // writes the binding; it answers and replays over the management API. It changes no status.
  wsMessage: {
    tables: merge(START_UP, { subscriptions: 'read', notifications: 'read', connections: 'read-write' }),
    putEvents: false,
    manageConnections: true,
  },
};

function merge(a: FunctionAccess['tables'], b: FunctionAccess['tables']): FunctionAccess['tables'] {
  const out: Partial<Record<TableRole, DataAccess>> = { ...a };
  for (const [role, access] of Object.entries(b) as [TableRole, DataAccess][]) {
    const before = out[role];
    out[role] = before === undefined || before === access ? access : 'read-write';
  }
  return out;
}
