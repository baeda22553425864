/**
 * What `npm run replay` reads: EventBridge events to send again to `POST /events`, from the forms
 * they are kept in. Pure: text in, batches out; the broker decides what each event is.
 *
 * - one event, or an array of events (a file saved from a log or from the docs' fixtures);
 * - one JSON value per line (NDJSON, as `jq -c` writes);
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

export function readReplayInput(name: string, text: string): ReplayInput {
  const batches: ReplayBatch[] = [];
  const skipped: { source: string; reason: string }[] = [];
  let whole: unknown;
  try {
    whole = JSON.parse(text);
  } catch {
    // Not one JSON value: one per line.
    text.split('\n').forEach((line, i) => {
      if (line.trim() === '') return;
      const source = `${name}:${i + 1}`;
      try {
        collect(source, JSON.parse(line), batches, skipped);
      } catch (err) {
        skipped.push({ source, reason: `not JSON (${(err as Error).message})` });
      }
    });
    return { batches, skipped };
  }
  collect(name, whole, batches, skipped);
  return { batches, skipped };
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
      batches.push({ source: value.length <= MAX_BATCH_EVENTS ? source : `${source}#${i}-${end}`, events });
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

/** The bodies of `aws sqs receive-message` output or of an SQS batch event; undefined for anything else. */
function sqsBodies(value: Json): unknown[] | undefined {
  if (Array.isArray(value.Messages)) return value.Messages.map((m) => (isObject(m) ? m.Body : undefined));
  if (Array.isArray(value.Records) && value.Records.every((r) => isObject(r) && r.eventSource === 'aws:sqs')) {
    return value.Records.map((r) => (r as Json).body);
  }
  return undefined;
}
