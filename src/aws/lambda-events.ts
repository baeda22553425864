import { createAwsBroker } from './aws-broker.js';
import { createHandlers } from './handlers.js';

/** EventBridge target for HealthLake's CloudTrail events. SDK clients are created once per container. */
const handlers = createHandlers(createAwsBroker());

export const handler = (event: unknown) => handlers.events(event);
