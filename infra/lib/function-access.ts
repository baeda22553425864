import type { TableNames } from '../../src/store/dynamodb/tables.js';

/**
 * What each Lambda function may reach, read off the code paths of its entry point (src/aws/) and
 * proven against the real handlers by test/aws-iam.test.ts: every DynamoDB request they send there
 * must be allowed by the synthesized role, and the role must allow nothing they did not use.
 * Every function also reads the credentials secret at start-up; that grant is not listed here, nor
 * the HealthLake reads, which depend on the FhirRead parameter (broker-stack.ts, reconcile.ts).
 */

export type TableRole = keyof TableNames;
/**
 * Item-level data access as CDK's `grantReadData` / `grantWriteData` / `grantReadWriteData` give it,
 * indexes included; `put`: `PutItem` alone (an internet-facing function that only adds items).
 */
export type DataAccess = 'read' | 'write' | 'read-write' | 'put';
export type FunctionName = 'events' | 'api' | 'dispatcher' | 'wsConnect' | 'wsDisconnect' | 'wsMessage' | 'reconcile';

export interface FunctionAccess {
  /** The tables the function reaches; one not named is out of its reach. */
  readonly tables: Readonly<Partial<Record<TableRole, DataAccess>>>;
  /** PutEvents on the broker's bus: it changes subscription state or dead-letters, and so publishes lifecycle events. */
  readonly putEvents: boolean;
  /** PostToConnection / GetConnection / DeleteConnection on the WebSocket stage. */
  readonly manageConnections: boolean;
}

/**
 * The type index (`subscription-types`) is made complete where it is read: before the first match
 * of a container (`MatchIndexedStore` in src/aws/aws-broker.ts), on tables whose index was never
 * built (the first match after an upgrade) a scan of `subscriptions` and writes of the index, a
 * marker read after that. Only what matches events does that (the events function, the API's
 * `POST /events`); no function builds it at start-up, so the WebSocket functions and the
 * dispatcher reach neither table for it.
 */

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
  // and event ids. It matches no events, so it never reads the type index; a 410 turning a
  // subscription off deletes the subscription's index items in the same transaction (a write).
  dispatcher: {
    tables: { ...EVERY_TABLE, subscriptionTypes: 'write' },
    putEvents: true,
    manageConnections: true,
  },
  // `$connect` (internet-facing) puts the connection item, and reads, updates and deletes nothing.
  wsConnect: { tables: { connections: 'put' }, putEvents: false, manageConnections: false },
  // `$disconnect` queries the connection's items and deletes them.
  wsDisconnect: { tables: { connections: 'read-write' }, putEvents: false, manageConnections: false },
  // A bind reads the subscriptions (the registry) and the stored notifications it replays, and
  // writes the binding; it answers and replays over the management API. It changes no status.
  wsMessage: {
    tables: { subscriptions: 'read', notifications: 'read', connections: 'read-write' },
    putEvents: false,
    manageConnections: true,
  },
  // What the events function does with a change (it accepts through the same pipeline and delivers
  // at once), plus what the reconciler reads: the subscriptions it lists (the types to search) and
  // reads again (created before the change?), the notifications it queries (already told?), and its
  // checkpoint, an item of `event-ids` (read, and moved on as each window is done). All within the
  // events function's grants: nothing beyond them.
  reconcile: { tables: EVERY_TABLE, putEvents: true, manageConnections: true },
};
