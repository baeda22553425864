import type { Context } from 'aws-lambda';
import { createAwsBroker } from './aws-broker.js';
import { createHandlers, toFunctionLog, type WebSocketEvent } from './handlers.js';

/** API Gateway WebSocket routes: `$connect`, `$disconnect`, `$default`. */
const handlers = createHandlers(createAwsBroker(), { emit: toFunctionLog });

export const connect = (event: WebSocketEvent) => handlers.connect(event);
export const disconnect = (event: WebSocketEvent) => handlers.disconnect(event);
export const message = (event: WebSocketEvent, context?: Context) => handlers.message(event, context);
