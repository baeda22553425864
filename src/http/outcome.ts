import { BrokerError, ERROR_CODES, type ErrorCode } from '../core/errors.js';
import { ERROR_CODE_SYSTEM } from '../core/fhir-urls.js';
import type { FhirResource } from '../core/types.js';

/** BrokerError → FHIR OperationOutcome: the one place errors become wire responses. */

export const FHIR_JSON = 'application/fhir+json; charset=utf-8';

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
