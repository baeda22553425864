/**
 * What `npm run replay` reads: EventBridge events to send again to `POST /events`, from the forms
 * they are kept in. Pure: text in, batches out; the broker decides what each event is.
 *
 * - one event, or an array of events (a file saved from a log or from the docs' fixtures);
 * - one JSON value per line (NDJSON, as `jq -c` writes), or JSON values one after another (as
 *   `aws sqs receive-message >> dlq.json` appends them);
 * - a dead-letter record, Lambda's on-failure record or the broker's own `Refused` one
 *   (`requestPayload` is the invocation's event, or array of events, as received);
 * - `aws sqs receive-message` output (`{"Messages": [{"Body": "…"}]}`) and an SQS batch as Lambda
 *   hands it over (`{"Records": [{"body": "…"}]}`), whose bodies are any of the above.
 *
 * Each record's events are one batch, sent as one request: a batch the broker refuses (a record
 * whose event was refused before, say) holds up no other. A plain array is cut into batches of
 * `MAX_BATCH_EVENTS`.
 */

export interface ReplayBatch {
  /** Where the batch came from, for the report: `file`, `file:line`, `file#index`. */
  readonly source: string;
  readonly events: readonly unknown[];
  /** For a batch cut from an array: its source without the range, and where in the array it starts. */
  readonly file?: string;
  readonly first?: number;
}

export interface ReplayInput {
  readonly batches: readonly ReplayBatch[];
  /** What was not sent, and why (a line that is not JSON, a record whose event was left out). */
  readonly skipped: readonly { readonly source: string; readonly reason: string }[];
}

/** Events per request from a plain array: well under the broker's 1,000 and its body limit. */
export const MAX_BATCH_EVENTS = 100;

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

export function readReplayInput(name: string, raw: string): ReplayInput {
  const batches: ReplayBatch[] = [];
  const skipped: { source: string; reason: string }[] = [];
  // A byte-order mark, as some editors save: not part of the JSON.
  const text = raw.replace(/^\uFEFF/, '');
  let whole: unknown;
  try {
    whole = JSON.parse(text);
  } catch {
    const lines = text.split('\n').map((line, i) => ({ source: `${name}:${i + 1}`, line }));
    const parsed = lines.filter((l) => l.line.trim() !== '').map((l) => ({ ...l, value: parseOrError(l.line) }));
    // Pretty-printed documents one after another (appended dumps): their lines are no JSON alone.
    const values = parsed.some((p) => p.value instanceof Error) ? jsonSequence(text) : undefined;
    if (values !== undefined) {
      for (const [i, value] of values.entries()) collect(`${name}#${i}`, value, batches, skipped);
      return { batches, skipped };
    }
    for (const p of parsed) {
      if (p.value instanceof Error) skipped.push({ source: p.source, reason: `not JSON (${p.value.message})` });
      else collect(p.source, p.value, batches, skipped);
    }
    return { batches, skipped };
  }
  collect(name, whole, batches, skipped);
  return { batches, skipped };
}

function parseOrError(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    return err as Error;
  }
}

/**
 * The JSON values of `text` written one after another (whitespace between them, or none), or
 * undefined when it is not that: objects and arrays are cut where their brackets close, outside
 * strings; anything else between them fails.
 */
function jsonSequence(text: string): unknown[] | undefined {
  const values: unknown[] = [];
  let i = 0;
  while (i < text.length) {
    while (i < text.length && /\s/.test(text[i] as string)) i++;
    if (i === text.length) break;
    const open = text[i];
    if (open !== '{' && open !== '[') return undefined;
    let depth = 0;
    let inString = false;
    let end = -1;
    for (let j = i; j < text.length; j++) {
      const c = text[j];
      if (inString) {
        if (c === '\\') j++;
        else if (c === '"') inString = false;
      } else if (c === '"') inString = true;
      else if (c === '{' || c === '[') depth++;
      else if (c === '}' || c === ']') {
        depth--;
        if (depth === 0) {
          end = j + 1;
          break;
        }
      }
    }
    if (end === -1) return undefined;
    const value = parseOrError(text.slice(i, end));
    if (value instanceof Error) return undefined;
    values.push(value);
    i = end;
  }
  return values.length > 1 ? values : undefined;
}

function collect(
  source: string,
  value: unknown,
  batches: ReplayBatch[],
  skipped: { source: string; reason: string }[],
  depth = 0,
): void {
  if (Array.isArray(value)) {
    if (value.length === 0) {
      skipped.push({ source, reason: 'an empty array' });
      return;
    }
    for (let i = 0; i < value.length; i += MAX_BATCH_EVENTS) {
      const events = value.slice(i, i + MAX_BATCH_EVENTS);
      const end = i + events.length - 1;
      const range = value.length <= MAX_BATCH_EVENTS ? source : end === i ? `${source}#${i}` : `${source}#${i}-${end}`;
      batches.push({ source: range, events, file: source, first: i });
    }
    return;
  }
  if (!isObject(value)) {
    skipped.push({ source, reason: `not an event (a JSON ${value === null ? 'null' : typeof value})` });
    return;
  }
  // SQS messages: each body is a record or an event of its own (at most one level down).
  const messages = sqsBodies(value);
  if (messages !== undefined && depth === 0) {
    messages.forEach((body, i) => {
      const where = `${source}#${i}`;
      if (typeof body !== 'string') {
        skipped.push({ source: where, reason: 'an SQS message without a body' });
        return;
      }
      try {
        collect(where, JSON.parse(body), batches, skipped, depth + 1);
      } catch (err) {
        skipped.push({ source: where, reason: `its body is not JSON (${(err as Error).message})` });
      }
    });
    return;
  }
  if (isObject(value.requestContext) && ('requestPayload' in value || 'requestPayloadOmitted' in value)) {
    if (!('requestPayload' in value)) {
      skipped.push({ source, reason: 'a record whose event was left out (too large for the queue)' });
      return;
    }
    collect(source, value.requestPayload, batches, skipped, depth + 1);
    return;
  }
  batches.push({ source, events: [value] });
}

/**
 * The bodies of `aws sqs receive-message` output (messages with a `MessageId`) or of an SQS batch
 * event (records from `aws:sqs`); undefined for anything else, which goes to the broker as it is.
 */
function sqsBodies(value: Json): unknown[] | undefined {
  const { Messages: messages, Records: records } = value;
  if (
    Array.isArray(messages) &&
    messages.length > 0 &&
    messages.every((m) => isObject(m) && typeof m.MessageId === 'string')
  ) {
    return messages.map((m) => (m as Json).Body);
  }
  if (
    Array.isArray(records) &&
    records.length > 0 &&
    records.every((r) => isObject(r) && r.eventSource === 'aws:sqs')
  ) {
    return records.map((r) => (r as Json).body);
  }
  return undefined;
}
