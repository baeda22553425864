import { createAwsBroker } from './aws-broker.js';
import { createHandlers } from './handlers.js';

/** Scheduled every minute: handshakes still owed, due retries, heartbeats, retention purge. */
const handlers = createHandlers(createAwsBroker());

export const handler = () => handlers.dispatch(60_000);
