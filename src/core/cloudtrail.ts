import { Ajv } from 'ajv';
import type { Interaction, ResourceChange } from './types.js';

/**
 * EventBridge "AWS API Call via CloudTrail" events from AWS HealthLake → ResourceChange.
 * Only the envelope is validated strictly; the CloudTrail detail is read defensively because
 * AWS adds fields over time and older events lack some (e.g. `additionalEventData`).
 */

const envelopeSchema = {
  type: 'object',
  required: ['id', 'source', 'detail-type'],
  properties: {
    // EventBridge's ids are UUIDs; other senders' may have spaces. Printable ASCII keeps the
    // deduplication key (the id) byte for byte the same
    // in every store: a lone UTF-16 surrogate is not, and two ids that differ only in one were
    // deduplicated as one.
    id: { type: 'string', minLength: 1, maxLength: 256, pattern: '^[\\x20-\\x7e]+$' },
    source: { type: 'string', minLength: 1, maxLength: 256 },
    'detail-type': { type: 'string', minLength: 1, maxLength: 256 },
    time: { type: 'string', maxLength: 64 },
    region: { type: 'string', maxLength: 64 },
    account: { type: 'string', maxLength: 64 },
    detail: { type: 'object' },
  },
} as const;

const ajv = new Ajv({ allErrors: false, strict: true });
const validateEnvelope = ajv.compile<EventBridgeEnvelope>(envelopeSchema);

export interface EventBridgeEnvelope {
  id: string;
  source: string;
  'detail-type': string;
  time?: string;
  region?: string;
  account?: string;
  detail?: Record<string, unknown>;
}

/**
 * The HealthLake calls that change one resource. A FHIR `PATCH` (HealthLake's `PatchResource`) is
 * an update to a subscriber: the resource has a new version, as after a `PUT`.
 */
const WRITE_CALLS: Readonly<Record<string, Interaction>> = {
  CreateResource: 'create',
  UpdateResource: 'update',
  PatchResource: 'update',
  DeleteResource: 'delete',
};

/**
 * Writes the broker sees but cannot turn into notifications: a batch or transaction Bundle is one
 * CloudTrail event that names none of the resources it changed. Ignored with a reason that says so
 * (and counted), rather than passed off as "not a resource write".
 */
const UNNAMED_WRITES: Readonly<Record<string, string>> = {
  ProcessBundle:
    'ProcessBundle (a batch or transaction Bundle) names none of the resources it changed: no notification can be derived from its event',
};

const RESOURCE_TYPE = /^[A-Z][A-Za-z]{1,63}$/;
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
const DATASTORE_ID = /^[A-Za-z0-9-]{1,128}$/;
const REGION = /^[a-z]{2}(-[a-z]+)+-\d$/;

export type ParsedEvent =
  | {
      readonly kind: 'change';
      readonly change: ResourceChange;
      /** What of the event was unusable and left out or guessed, for the log. */
      readonly warnings?: readonly string[];
    }
  | {
      readonly kind: 'ignored';
      readonly eventId: string;
      readonly reason: string;
      /**
       * A successful write the broker cannot turn into notifications (a batch Bundle, or a write
       * without a usable resource type or datastore id): a change its subscribers miss, so the
       * operator is told louder than for a call that changed nothing.
       */
      readonly unusableWrite?: true;
    };

/** Thrown for a body element that is not an EventBridge event at all. */
export class InvalidEnvelopeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'InvalidEnvelopeError';
  }
}

/** `receivedAt` stands in for the change time when the event carries none. */
export function parseEventBridgeEvent(input: unknown, receivedAt: string): ParsedEvent {
  if (!validateEnvelope(input)) {
    const e = validateEnvelope.errors?.[0];
    // Ajv would quote the pattern; say what it means.
    const message = e?.keyword === 'pattern' ? 'must be printable ASCII' : e?.message;
    throw new InvalidEnvelopeError(`${e?.instancePath || '(event)'} ${message ?? 'is invalid'}`.trim());
  }
  const event = input;
  const ignored = (reason: string): ParsedEvent => ({ kind: 'ignored', eventId: event.id, reason });
  const unusable = (reason: string): ParsedEvent => ({
    kind: 'ignored',
    eventId: event.id,
    reason,
    unusableWrite: true,
  });
  if (event.source !== 'aws.healthlake') return ignored(`source ${event.source} is not aws.healthlake`);
  if (event['detail-type'] !== 'AWS API Call via CloudTrail') return ignored(`detail-type ${event['detail-type']}`);
  const detail = event.detail;
  if (detail === undefined) return ignored('CloudTrail event without detail');
  const eventName = typeof detail.eventName === 'string' ? detail.eventName : '';
  const interaction = Object.hasOwn(WRITE_CALLS, eventName) ? WRITE_CALLS[eventName] : undefined;
  const unnamed = Object.hasOwn(UNNAMED_WRITES, eventName) ? UNNAMED_WRITES[eventName] : undefined;
  if (interaction === undefined && unnamed === undefined) {
    return ignored(`${eventName || 'unnamed call'} is not a resource write`);
  }
  if (detail.errorCode !== undefined && detail.errorCode !== null)
    return ignored(`failed call (${String(detail.errorCode)})`);
  if (detail.readOnly === true) return ignored('read-only call');
  if (interaction === undefined) return unusable(unnamed as string);

  const params = asRecord(detail.requestParameters);
  const resourceType = params?.resourceType;
  const datastoreId = params?.datastoreId;
  if (typeof resourceType !== 'string' || !RESOURCE_TYPE.test(resourceType)) {
    return unusable(`${eventName} without a valid requestParameters.resourceType`);
  }
  if (typeof datastoreId !== 'string' || !DATASTORE_ID.test(datastoreId)) {
    return unusable(`${eventName} without a valid requestParameters.datastoreId`);
  }
  // The change did happen: what of its detail is unusable is left out (or guessed) and said, not
  // allowed to refuse the event.
  const warnings: string[] = [];
  /** `value` when it matches `pattern`; undefined, and said when one was given, when not. */
  const valid = (value: unknown, pattern: RegExp, said: (shape: string) => string): string | undefined => {
    if (typeof value === 'string' && pattern.test(value)) return value;
    if (value !== undefined && value !== null) warnings.push(said(describeValue(value)));
    return undefined;
  };
  const resourceId = valid(
    asRecord(detail.additionalEventData)?.resourceId,
    FHIR_ID,
    (shape) => `additionalEventData.resourceId (${shape}) is not a FHIR id: no focus`,
  );
  const region = [detail.awsRegion, event.region].find((r): r is string => typeof r === 'string' && REGION.test(r));
  if (region === undefined) warnings.push('neither detail.awsRegion nor region is an AWS region: us-east-1 assumed');
  const time = pickTime(detail.eventTime, event.time) ?? receivedAt;

  return {
    kind: 'change',
    change: {
      // ARCHITECTURE.md: deduplicate on the EventBridge id (not the CloudTrail eventID; see types.ts).
      eventId: event.id,
      resourceType,
      ...(resourceId === undefined ? {} : { resourceId }),
      interaction,
      datastoreId,
      fhirBase: `https://healthlake.${region ?? 'us-east-1'}.amazonaws.com/datastore/${datastoreId}/r4`,
      time,
    },
    ...(warnings.length === 0 ? {} : { warnings }),
  };
}

/** An untrusted value's shape, never its content (it may be long, or anything at all). */
function describeValue(value: unknown): string {
  return typeof value === 'string' ? `${value.length} characters` : typeof value;
}

function asRecord(value: unknown): Record<string, unknown> | undefined {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
    ? (value as Record<string, unknown>)
    : undefined;
}

function pickTime(...candidates: unknown[]): string | undefined {
  for (const c of candidates) {
    if (typeof c === 'string' && !Number.isNaN(Date.parse(c))) return new Date(Date.parse(c)).toISOString();
  }
  return undefined;
}
