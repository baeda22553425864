import type { Context } from 'hono';
import { BrokerError } from '../core/errors.js';

/**
 * Reads a JSON body with a hard byte cap (checked on Content-Length and again while streaming, so
 * a chunked body cannot slip past it) and a media-type check.
 */

const JSON_TYPES = new Set(['application/json', 'application/fhir+json']);

export async function readJsonBody(c: Context, maxBytes: number): Promise<unknown> {
  const type = (c.req.header('content-type') ?? '').split(';')[0]?.trim().toLowerCase() ?? '';
  if (!JSON_TYPES.has(type)) {
    throw new BrokerError(
      'UNSUPPORTED_MEDIA_TYPE',
      `Content-Type ${type === '' ? '(none)' : type} is not accepted; send application/fhir+json or application/json`,
    );
  }
  const declared = Number(c.req.header('content-length') ?? Number.NaN);
  if (declared > maxBytes) throw tooLarge(maxBytes);
  const stream = c.req.raw.body;
  if (stream === null) throw new BrokerError('BAD_JSON', 'The body is empty');
  const chunks: Uint8Array[] = [];
  let size = 0;
  const reader = stream.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > maxBytes) {
      await reader.cancel().catch(() => undefined);
      throw tooLarge(maxBytes);
    }
    chunks.push(value);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (text.trim() === '') throw new BrokerError('BAD_JSON', 'The body is empty');
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new BrokerError('BAD_JSON', `The body is not valid JSON: ${(err as Error).message}`, { cause: err });
  }
}

function tooLarge(maxBytes: number): BrokerError {
  return new BrokerError('PAYLOAD_TOO_LARGE', `The body is larger than ${maxBytes} bytes`);
}
