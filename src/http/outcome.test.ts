import { Hono } from 'hono';
import { describe, expect, it } from 'vitest';
import { BrokerError } from '../core/errors.js';
import { FHIR_JSON, fhirJsonRepresentation, fhirResponse, operationOutcome } from './outcome.js';

/** The middleware as the FHIR routes would mount it, in front of a route, an error and a bodiless answer. */
function app(): Hono {
  const app = new Hono();
  app.use('/fhir/*', fhirJsonRepresentation);
  app.get('/fhir/metadata', () => fhirResponse({ resourceType: 'CapabilityStatement' }));
  app.get('/fhir/fails', () => {
    throw new BrokerError('NOT_FOUND', 'nothing here');
  });
  app.delete('/fhir/gone', () => new Response(null, { status: 204 }));
  app.onError((err) => fhirResponse(operationOutcome('NOT_FOUND', err.message), 404));
  return app;
}

async function answer(path: string, accept?: string, method = 'GET') {
  const res = await app().request(path, { method, headers: accept === undefined ? {} : { accept } });
  return [res.status, res.headers.get('content-type'), await res.text()];
}

describe('fhirJsonRepresentation', () => {
  it('answers a request for the generic application/json in that type, the body unchanged', async () => {
    const body = JSON.stringify({ resourceType: 'CapabilityStatement' });
    expect(await answer('/fhir/metadata', 'application/json')).toEqual([200, 'application/json; charset=utf-8', body]);
    expect(await answer('/fhir/metadata?_format=application/json')).toEqual([
      200,
      'application/json; charset=utf-8',
      body,
    ]);
  });

  it('relabels an OperationOutcome too', async () => {
    const [status, type] = await answer('/fhir/fails', 'application/json');
    expect([status, type]).toEqual([404, 'application/json; charset=utf-8']);
  });

  it.each([undefined, 'application/fhir+json', '*/*', 'application/json, application/fhir+json'])(
    'keeps application/fhir+json for Accept %s',
    async (accept) => {
      expect((await answer('/fhir/metadata', accept))[1]).toBe(FHIR_JSON);
    },
  );

  it('keeps FHIR JSON for _format=json, and leaves an answer without a body alone', async () => {
    expect((await answer('/fhir/metadata?_format=json', 'application/json'))[1]).toBe(FHIR_JSON);
    expect(await answer('/fhir/gone', 'application/json', 'DELETE')).toEqual([204, null, '']);
  });
});
