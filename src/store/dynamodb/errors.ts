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

/** A transaction kept colliding with concurrent writes to the same items. */
export class WriteConflictError extends Error {
  constructor(what: string, attempts: number, options?: ErrorOptions) {
    super(`${what}: still conflicting after ${attempts} attempts`, options);
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
