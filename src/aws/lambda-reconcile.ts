import type { Context } from 'aws-lambda';
import { createAwsBroker } from './aws-broker.js';
import { createHandlers, toFunctionLog } from './handlers.js';

/**
 * Scheduled every BROKER_RECONCILE_EVERY: one reconciliation run, which notifies the changes whose
 * CloudTrail event never reached the broker (src/service/reconciler.ts).
 */
const handlers = createHandlers(createAwsBroker(), { emit: toFunctionLog });

export const handler = (_event: unknown, context?: Context) => handlers.reconcile(context);
