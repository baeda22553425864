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
  // As AWS reads a query (RFC 3986): `%XX` decoded, a `+` a plus sign; then each part encoded with
  // only the unreserved characters left as they are.
  const encode = (s: string) =>
    encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
  const canonicalQuery = req.query
    .slice(1)
    .split('&')
    .filter((pair) => pair !== '')
    .map((pair) => {
      const cut = pair.indexOf('=');
      const [k, v] = cut === -1 ? [pair, ''] : [pair.slice(0, cut), pair.slice(cut + 1)];
      return `${encode(decodeURIComponent(k))}=${encode(decodeURIComponent(v))}`;
    })
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
