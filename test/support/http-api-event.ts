import { randomUUID } from 'node:crypto';

/**
 * An API Gateway HTTP API (payload format 2.0) event for `method path` (a query string included),
 * as the `$default` route hands it to the API function: a bearer token, and a JSON body when given.
 */
export function httpApiEvent(
  method: string,
  path: string,
  options: { token: string; body?: unknown; headers?: Record<string, string> },
): Record<string, unknown> {
  const [rawPath = '', rawQueryString = ''] = path.split('?');
  return {
    version: '2.0',
    routeKey: '$default',
    rawPath,
    rawQueryString,
    headers: {
      authorization: `Bearer ${options.token}`,
      host: 'api.example.com',
      ...(options.body === undefined ? {} : { 'content-type': 'application/fhir+json' }),
      ...options.headers,
    },
    requestContext: {
      accountId: '111122223333',
      apiId: 'api',
      domainName: 'api.example.com',
      domainPrefix: 'api',
      http: { method, path: rawPath, protocol: 'HTTP/1.1', sourceIp: '203.0.113.1', userAgent: 'test' },
      requestId: randomUUID(),
      routeKey: '$default',
      stage: '$default',
      time: '26/Nov/2026:12:00:00 +0000',
      timeEpoch: Date.now(),
    },
    isBase64Encoded: false,
    ...(options.body === undefined ? {} : { body: JSON.stringify(options.body) }),
  };
}
