import type { Context } from 'aws-lambda';
import { createAwsBroker } from './aws-broker.js';
import { createHandlers, toFunctionLog } from './handlers.js';

/** EventBridge target for HealthLake's CloudTrail events. SDK clients are created once per container. */
const handlers = createHandlers(createAwsBroker(), { emit: toFunctionLog });

export const handler = (event: unknown, context?: Context) => handlers.events(event, context);
