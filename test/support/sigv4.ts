import { createHash, createHmac } from 'node:crypto';
import type { FhirRequest } from './fhir-server.js';

/**
 * AWS Signature Version 4, computed by hand from the request as the server received it
 * (docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html): the check HealthLake makes.
 */
export function sigV4Signature(req: FhirRequest, secretAccessKey: string, region: string): string {
  const sha256 = (data: string) => createHash('sha256').update(data).digest('hex');
  const hmac = (key: Buffer | string, data: string) => createHmac('sha256', key).update(data).digest();
  const date = String(req.headers['x-amz-date']);
  const signed = /SignedHeaders=([^,]+)/.exec(String(req.headers.authorization))?.[1]?.split(';') ?? [];
  const query = new URLSearchParams(req.query);
  const canonicalQuery = [...query.entries()]
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`)
    .sort()
    .join('&');
  const canonical = [
    req.method,
    req.path,
    canonicalQuery,
    ...signed.map((h) => `${h}:${String(req.headers[h]).trim()}`),
    '',
    signed.join(';'),
    String(req.headers['x-amz-content-sha256']),
  ].join('\n');
  const scope = `${date.slice(0, 8)}/${region}/healthlake/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', date, scope, sha256(canonical)].join('\n');
  let key = hmac(`AWS4${secretAccessKey}`, date.slice(0, 8));
  for (const part of [region, 'healthlake', 'aws4_request']) key = hmac(key, part);
  return createHmac('sha256', key).update(toSign).digest('hex');
}
