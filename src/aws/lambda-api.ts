import type { Context } from 'aws-lambda';
import { createAwsBroker } from './aws-broker.js';
import { createHandlers, type Handlers, toFunctionLog } from './handlers.js';

/** The REST API (`/fhir`, `/events`, `/healthz`, `/metrics`, `/live`) behind an API Gateway HTTP API. */
const handlers = createHandlers(createAwsBroker(), { emit: toFunctionLog });

export const handler = (event: Parameters<Handlers['api']>[0], context: Context) => handlers.api(event, context);
