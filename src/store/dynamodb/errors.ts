import { BrokerError } from '../../core/errors.js';

/**
 * What the DynamoDB adapter raises on purpose. Conditional-write failures the Store port defines
 * as outcomes (an unknown id, a failed compare-and-set) are answers, not errors; these are the rest.
 */

/** `insertSubscription` with an id that is already taken (the conditional put failed). */
export class SubscriptionExistsError extends Error {
  constructor(
    readonly subscriptionId: string,
    options?: ErrorOptions,
  ) {
    super(`Subscription ${subscriptionId} already exists`, options);
    this.name = 'SubscriptionExistsError';
  }
}

/** An item lacks an attribute the adapter always writes: the table was written by something else. */
export class CorruptItemError extends Error {
  constructor(attribute: string, expected: string) {
    super(`Stored item attribute ${attribute} is not ${expected}`);
    this.name = 'CorruptItemError';
  }
}

/**
 * A transaction kept colliding with concurrent writes to the same items. A `CONFLICT` (409) at the
 * HTTP edge: nothing was written, and the client may simply try again.
 */
export class WriteConflictError extends BrokerError {
  constructor(what: string, attempts: number, options?: ErrorOptions) {
    super('CONFLICT', `${what}: still conflicting after ${attempts} attempts; try again`, options);
    this.name = 'WriteConflictError';
  }
}

/** DynamoDB left part of a batch unprocessed for longer than the adapter waits. */
export class UnprocessedItemsError extends Error {
  constructor(operation: string, left: number) {
    super(`${operation}: ${left} item(s) still unprocessed after retries`);
    this.name = 'UnprocessedItemsError';
  }
}

/** `ensureTables`: a table did not become ACTIVE in time. */
export class TableNotReadyError extends Error {
  constructor(table: string, options?: ErrorOptions) {
    super(`Table ${table} did not become ACTIVE`, options);
    this.name = 'TableNotReadyError';
  }
}
