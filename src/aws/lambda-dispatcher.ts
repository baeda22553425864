import type { Context } from 'aws-lambda';
import { createAwsBroker } from './aws-broker.js';
import { createHandlers, toFunctionLog } from './handlers.js';

/** Scheduled every minute: handshakes still owed, due retries, heartbeats, retention purge. */
const handlers = createHandlers(createAwsBroker(), { emit: toFunctionLog });

export const handler = (_event: unknown, context?: Context) => handlers.dispatch(60_000, context);
