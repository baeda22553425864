import type { MiddlewareHandler } from 'hono';
import { BrokerError, ERROR_CODES, type ErrorCode } from '../core/errors.js';
import { ERROR_CODE_SYSTEM } from '../core/fhir-urls.js';
import { FHIR_JSON_TYPE, GENERIC_JSON_TYPE, mediaType, negotiateJson } from '../core/media-type.js';
import type { FhirResource } from '../core/types.js';

/** BrokerError → FHIR OperationOutcome: the one place errors become wire responses. */

export const FHIR_JSON = `${FHIR_JSON_TYPE}; charset=utf-8`;
const GENERIC_JSON = `${GENERIC_JSON_TYPE}; charset=utf-8`;

export function operationOutcome(code: ErrorCode, diagnostics: string, expression?: string): FhirResource {
  return {
    resourceType: 'OperationOutcome',
    issue: [
      {
        severity: 'error',
        code: ERROR_CODES[code].issue,
        details: { coding: [{ system: ERROR_CODE_SYSTEM, code }], text: ERROR_CODES[code].text },
        diagnostics,
        ...(expression === undefined ? {} : { expression: [expression] }),
      },
    ],
  };
}

export function outcomeOf(err: unknown): { status: number; body: FhirResource } {
  if (err instanceof BrokerError) {
    return { status: err.status, body: operationOutcome(err.code, err.message, err.expression) };
  }
  return { status: 500, body: operationOutcome('INTERNAL', 'An unexpected error occurred; see the broker log') };
}

export function fhirResponse(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'content-type': FHIR_JSON, ...headers } });
}

/**
 * A FHIR JSON answer to a request that asked for the generic `application/json` (Accept, or
 * `_format=application/json`) goes out as that type, its body the same: R4 http.html says a server
 * SHOULD answer in the generic type asked for. After the route, so its answer, an OperationOutcome
 * included, is what is relabelled; other answers (no body, text) keep their type.
 */
export const fhirJsonRepresentation: MiddlewareHandler = async (c, next) => {
  await next();
  if (mediaType(c.res.headers.get('content-type') ?? undefined) !== FHIR_JSON_TYPE) return;
  if (negotiateJson(c.req.query('_format'), c.req.header('accept')) !== GENERIC_JSON_TYPE) return;
  c.res.headers.set('content-type', GENERIC_JSON);
};
