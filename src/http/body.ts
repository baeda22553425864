import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Context } from 'hono';
import { BrokerError } from '../core/errors.js';
import { mediaType, mediaTypeParameter, otherCharset, otherFhirVersion } from '../core/media-type.js';

/**
 * Reads a JSON body with a hard byte cap (checked on Content-Length and again while reading, so a
 * chunked body cannot slip past it) and a media-type check.
 *
 * Under the Node server (`c.env.incoming`) the body is read straight from the socket stream: the
 * WHATWG `Request` body (a web ReadableStream wrapped around the same stream) cost more CPU than
 * the rest of `POST /events` together. Elsewhere (Lambda, `app.request` in tests) the web body.
 */

/** JSON, FHIR JSON, and `application/json+fhir`, the DSTU2 name older clients still send. */
const JSON_TYPES = new Set(['application/json', 'application/fhir+json', 'application/json+fhir']);

export interface NodeBindings {
  readonly incoming?: IncomingMessage;
  readonly outgoing?: ServerResponse;
}

export async function readJsonBody(c: Context, maxBytes: number): Promise<unknown> {
  checkJsonRequest(c.req.header('content-type'), c.req.header('content-length'), maxBytes);
  return parseJsonBody(await readBody(c, maxBytes));
}

/** The body's bytes, at most `maxBytes` (413 past that, however it is sent). */
export async function readBody(c: Context, maxBytes: number): Promise<Buffer> {
  if (Number(c.req.header('content-length') ?? Number.NaN) > maxBytes) throw tooLarge(maxBytes);
  const node = c.env as NodeBindings | undefined;
  return node?.incoming !== undefined
    ? readNodeBody(node.incoming, node.outgoing, maxBytes)
    : readWebBody(c.req.raw.body, maxBytes);
}

/** Media type (its charset and fhirVersion too) and declared length, before a byte is read: 415 or 413. */
export function checkJsonRequest(
  contentType: string | undefined,
  contentLength: string | undefined,
  maxBytes: number,
): void {
  const type = mediaType(contentType);
  if (!JSON_TYPES.has(type)) {
    throw new BrokerError(
      'UNSUPPORTED_MEDIA_TYPE',
      `Content-Type ${type === '' ? '(none)' : type} is not accepted; send application/fhir+json or application/json`,
    );
  }
  if (contentType?.includes(';') === true) checkJsonParameters(contentType);
  if (Number(contentLength ?? Number.NaN) > maxBytes) throw tooLarge(maxBytes);
}

/**
 * A JSON body's charset is UTF-8 (RFC 8259 §8.1, R4 http.html): one in another charset would be
 * read as UTF-8 and stored garbled. And its FHIR version is R4's, as a response's is (Accept).
 */
function checkJsonParameters(contentType: string): void {
  const charset = otherCharset(contentType);
  if (charset !== undefined) {
    throw new BrokerError(
      'UNSUPPORTED_MEDIA_TYPE',
      `Content-Type charset ${charset.slice(0, 32)} is not accepted; send UTF-8 (charset=utf-8, or no charset)`,
    );
  }
  if (otherFhirVersion(contentType)) {
    const version = (mediaTypeParameter(contentType, 'fhirVersion') ?? '').slice(0, 32);
    throw new BrokerError(
      'UNSUPPORTED_MEDIA_TYPE',
      `Content-Type fhirVersion=${version} is not accepted: the broker speaks FHIR 4.0 (R4); send fhirVersion=4.0 or none`,
    );
  }
}

/**
 * Before answering a request whose body was not read to its end (refused first: 401, 415, 404,
 * 405, 413 on its declared length): `connection: close`. Kept alive, Node would read the rest of
 * the body to reach the next request, throwing it away: a declared 200 MiB, or a chunked body that
 * never ends, from a client with no token. Closing, Node destroys the socket as soon as the answer
 * is written. A body read whole, or none, keeps the connection.
 */
export function closeIfBodyUnread(incoming: IncomingMessage, outgoing: ServerResponse): void {
  if (incoming.readableEnded || outgoing.headersSent) return;
  const { 'content-length': length, 'transfer-encoding': encoding } = incoming.headers;
  if (encoding === undefined && !(Number(length) > 0)) return;
  outgoing.setHeader('connection', 'close');
}

/**
 * Strict UTF-8: bytes that are not UTF-8 are refused, not read as U+FFFD. Checking and decoding are
 * one pass (Node's is as fast as `toString('utf8')`, which checks nothing); no state is kept between
 * calls, so one decoder serves every request. A byte order mark is kept, and refused below.
 */
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

export function parseJsonBody(bytes: Buffer): unknown {
  let text: string;
  try {
    text = UTF8.decode(bytes);
  } catch (err) {
    throw new BrokerError('BAD_JSON', 'The body is not valid UTF-8, which JSON sent between systems is', {
      cause: err,
    });
  }
  // RFC 8259 §8.1: JSON sent over a network has no byte order mark; a parser MAY ignore one, the
  // broker refuses it, as it always has (JSON.parse does, with a message that shows nothing).
  if (text.charCodeAt(0) === 0xfeff) {
    throw new BrokerError(
      'BAD_JSON',
      'The body starts with a byte order mark (U+FEFF), which JSON must not; send it without',
    );
  }
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    if (text.trim() === '') throw new BrokerError('BAD_JSON', 'The body is empty');
    throw new BrokerError('BAD_JSON', `The body is not valid JSON: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * Requests that asked to wait before sending their body (`Expect: 100-continue`) and have not been
 * told to go on: the server's `checkContinue` listener (main.ts) adds them instead of letting Node
 * answer `100 Continue` at once, and the body read below sends it. So the checks that need no body
 * (token, media type, declared length) come first, and a refused upload is never sent: a client
 * waiting for `100` gets the `401`/`413` instead of a reset in the middle of its upload.
 */
export const awaitingContinue = new WeakSet<IncomingMessage>();

/** Reads at most `maxBytes` from the socket stream; past that, 413 and the connection closes after the answer. */
export function readNodeBody(
  incoming: IncomingMessage,
  outgoing: ServerResponse | undefined,
  maxBytes: number,
): Promise<Buffer> {
  if (awaitingContinue.delete(incoming) && outgoing !== undefined && !outgoing.headersSent) outgoing.writeContinue();
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const done = (err?: Error): void => {
      incoming.off('data', onData).off('end', onEnd).off('error', onError).off('close', onClose);
      if (err !== undefined) reject(err);
      else resolve(chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks));
    };
    const onData = (chunk: Buffer): void => {
      size += chunk.byteLength;
      if (size <= maxBytes) {
        chunks.push(chunk);
        return;
      }
      // Stop reading: the 413 goes out and the connection closes instead of draining the rest.
      incoming.pause();
      outgoing?.setHeader('connection', 'close');
      done(tooLarge(maxBytes));
    };
    const onEnd = (): void => done();
    const onError = (err: Error): void =>
      done(new BrokerError('BAD_JSON', `The body could not be read: ${err.message}`));
    const onClose = (): void => {
      if (!incoming.complete) done(new BrokerError('BAD_JSON', 'The client closed the connection mid-body'));
    };
    if (incoming.readableEnded) {
      resolve(Buffer.alloc(0));
      return;
    }
    incoming.on('data', onData).on('end', onEnd).on('error', onError).on('close', onClose);
  });
}

async function readWebBody(stream: ReadableStream<Uint8Array> | null, maxBytes: number): Promise<Buffer> {
  if (stream === null) return Buffer.alloc(0);
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
  return Buffer.concat(chunks);
}

function tooLarge(maxBytes: number): BrokerError {
  return new BrokerError('PAYLOAD_TOO_LARGE', `The body is larger than ${maxBytes} bytes`);
}
