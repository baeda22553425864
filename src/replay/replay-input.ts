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
 *   hands it over (`{"Records": [{"body": "…"}]}`), whose bodies are any of the above;
 * - a CloudTrail log file (`{"Records": [<CloudTrail record>, …]}`, as a trail writes them to S3;
 *   main.ts unzips a `.json.gz`): each HealthLake call that is not read-only becomes the event
 *   EventBridge makes of it, under the id `cloudtrail-<eventID>` (see `trailEvent`); calls to other
 *   services and read-only ones are left out, and counted.
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
  /** CloudTrail records left out on purpose (other services, read-only calls): how many, and why. */
  readonly leftOut: readonly LeftOut[];
}

export interface LeftOut {
  readonly source: string;
  readonly reason: string;
  readonly count: number;
}

/** Events per request from a plain array: well under the broker's 1,000 and its body limit. */
export const MAX_BATCH_EVENTS = 100;

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

export function readReplayInput(name: string, raw: string): ReplayInput {
  const batches: ReplayBatch[] = [];
  const skipped: { source: string; reason: string }[] = [];
  const leftOut: LeftOut[] = [];
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
      for (const [i, value] of values.entries()) collect(`${name}#${i}`, value, batches, skipped, leftOut);
      return { batches, skipped, leftOut };
    }
    for (const p of parsed) {
      if (p.value instanceof Error) skipped.push({ source: p.source, reason: `not JSON (${p.value.message})` });
      else collect(p.source, p.value, batches, skipped, leftOut);
    }
    return { batches, skipped, leftOut };
  }
  collect(name, whole, batches, skipped, leftOut);
  return { batches, skipped, leftOut };
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
  leftOut: LeftOut[],
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
        collect(where, JSON.parse(body), batches, skipped, leftOut, depth + 1);
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
    collect(source, value.requestPayload, batches, skipped, leftOut, depth + 1);
    return;
  }
  const trail = trailRecords(value);
  if (trail !== undefined && depth === 0) {
    const events: unknown[] = [];
    const left = new Map<string, number>();
    for (const record of trail) {
      const reason =
        record.eventSource !== HEALTHLAKE
          ? 'calls to other services than HealthLake'
          : record.readOnly === true
            ? 'read-only HealthLake calls'
            : undefined;
      if (reason === undefined) events.push(trailEvent(record));
      else left.set(reason, (left.get(reason) ?? 0) + 1);
    }
    for (const [reason, count] of left) leftOut.push({ source, reason, count });
    if (events.length > 0) collect(source, events, batches, skipped, leftOut, depth + 1);
    return;
  }
  batches.push({ source, events: [value] });
}

const HEALTHLAKE = 'healthlake.amazonaws.com';

/** The records of a CloudTrail log file (each with an `eventVersion` and an `eventID`), or undefined. */
function trailRecords(value: Json): Json[] | undefined {
  const { Records: records } = value;
  if (!Array.isArray(records) || records.length === 0) return undefined;
  const isRecord = (r: unknown): r is Json =>
    isObject(r) && typeof r.eventVersion === 'string' && typeof r.eventID === 'string';
  return records.every(isRecord) ? records : undefined;
}

/**
 * The event EventBridge makes of a CloudTrail record ("AWS API Call via CloudTrail", the record as
 * its `detail`), under the id `cloudtrail-<eventID>`: a trail file sent twice is deduplicated. The
 * events EventBridge delivered had ids of its own, which the trail does not keep: replay a trail for
 * the time EventBridge did not deliver (a rule disabled, a broker gone past EventBridge's retries),
 * or its changes are notified again.
 */
function trailEvent(record: Json): Json {
  const identity = isObject(record.userIdentity) ? record.userIdentity : {};
  const account = record.recipientAccountId ?? identity.accountId;
  return {
    version: '0',
    id: `cloudtrail-${String(record.eventID)}`,
    'detail-type': 'AWS API Call via CloudTrail',
    source: 'aws.healthlake',
    ...(typeof account === 'string' ? { account } : {}),
    ...(typeof record.eventTime === 'string' ? { time: record.eventTime } : {}),
    ...(typeof record.awsRegion === 'string' ? { region: record.awsRegion } : {}),
    resources: [],
    detail: record,
  };
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
