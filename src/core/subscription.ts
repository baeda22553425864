import { Ajv } from 'ajv';
import { BrokerError, type ErrorCode } from './errors.js';
import { BACKPORT_EXT, BACKPORT_PROFILE, BROKER_EXT } from './fhir-urls.js';
import { mediaType } from './media-type.js';
import { R4_RESOURCE_TYPES } from './resource-types.js';
import { type ContentFilter, FilterError, parseContentFilter, type SearchParameterCatalog } from './search-filter.js';
import type { TopicCatalog, TopicDefinition } from './topics.js';
import type {
  Channel,
  ChannelType,
  FhirResource,
  MatchSpec,
  PayloadContent,
  SubscriptionKind,
  SubscriptionRecord,
  SubscriptionStatus,
} from './types.js';
import { INTERACTIONS } from './types.js';

/**
 * A client's FHIR Subscription (R4, Subscriptions R5 Backport IG or classic criteria) →
 * what the broker needs to match and deliver. Fails closed: anything the broker cannot honour
 * from a CloudTrail event is refused with a reason, never silently widened or narrowed.
 */

export interface SubscriptionSpec {
  readonly kind: SubscriptionKind;
  readonly topic: string;
  readonly match: MatchSpec;
  readonly channel: Channel;
  /** The client's own secret, when it sent one. */
  readonly webhookSecret?: string;
  /** The status the client sent, if any; the status machine decides what it leads to. */
  readonly askedStatus?: SubscriptionStatus;
  readonly end?: string;
  /** The resource as the broker will store it: without the secret, status left to the broker. */
  readonly resource: FhirResource;
}

interface Extension {
  url: string;
  valueString?: string;
  valueCode?: string;
  valueUnsignedInt?: number;
  valuePositiveInt?: number;
  [key: string]: unknown;
}

interface SubscriptionJson {
  resourceType: 'Subscription';
  id?: string;
  status?: string;
  criteria: string;
  _criteria?: { extension?: Extension[] };
  end?: string;
  reason?: string;
  _reason?: { extension?: Extension[] };
  meta?: { profile?: string[]; security?: Coding[]; tag?: Coding[] };
  channel: {
    type: string;
    _type?: { extension?: Extension[] };
    endpoint?: string;
    payload?: string;
    _payload?: { extension?: Extension[] };
    header?: string[];
    extension?: Extension[];
  };
  [key: string]: unknown;
}

/** An R4 Coding, kept as sent (`meta.tag`, `meta.security`). */
type Coding = Record<string, unknown>;

const extension = {
  type: 'object',
  required: ['url'],
  properties: { url: { type: 'string', minLength: 1 } },
} as const;
/** Where extensions decide what is delivered: a few are understood, so a long list is refused early. */
const extensions = { type: 'array', items: extension, maxItems: 50 } as const;
/** Where extensions only inform: kept as sent, bounded by the stored size alone. */
const anyExtensions = { type: 'array', items: extension } as const;
/**
 * The `_name` sibling of a primitive (R4 `Element`): its id and extensions, nothing else (an
 * Element has no `modifierExtension`): what the broker would keep without understanding is refused.
 */
const primitiveElement = {
  type: 'object',
  properties: { id: { type: 'string' }, extension: anyExtensions },
  additionalProperties: false,
} as const;
/** The same, on a primitive whose extensions decide what is delivered. */
const decidingElement = {
  type: 'object',
  properties: { id: { type: 'string' }, extension: extensions },
  additionalProperties: false,
} as const;
/** An R4 Coding: `title` names the type when an element it does not define is refused. */
const coding = {
  title: 'Coding',
  type: 'object',
  properties: {
    id: { type: 'string' },
    extension: anyExtensions,
    system: { type: 'string' },
    _system: primitiveElement,
    version: { type: 'string' },
    _version: primitiveElement,
    code: { type: 'string' },
    _code: primitiveElement,
    display: { type: 'string' },
    _display: primitiveElement,
    userSelected: { type: 'boolean' },
    _userSelected: primitiveElement,
  },
  additionalProperties: false,
} as const;
/**
 * R4 Meta: the client's `profile`, `security` and `tag` are kept (R4 http.html: a server SHOULD
 * return the resource as submitted); `versionId` and `lastUpdated` are the broker's, and the rest
 * (`source`, `id`, `extension`) is not kept, as R4 lets a server do with metadata.
 */
const meta = {
  type: 'object',
  properties: {
    // canonical: a URI, no whitespace.
    profile: { type: 'array', items: { type: 'string', pattern: '^\\S+$' } },
    security: { type: 'array', items: coding },
    tag: { type: 'array', items: coding },
  },
} as const;
/** R4 Narrative: its status and XHTML `div` both required. */
const narrative = {
  title: 'Narrative',
  type: 'object',
  required: ['status', 'div'],
  properties: {
    id: { type: 'string' },
    extension: anyExtensions,
    status: { enum: ['generated', 'extensions', 'additional', 'empty'] },
    _status: primitiveElement,
    div: { type: 'string', pattern: '^<div[\\s>]' },
  },
  additionalProperties: false,
} as const;
/** R4 JSON types of the elements the broker keeps without reading, so what it serves back is FHIR. */
const keptElements = {
  meta,
  implicitRules: { type: 'string' },
  _implicitRules: primitiveElement,
  language: { type: 'string' },
  _language: primitiveElement,
  text: narrative,
  contained: {
    type: 'array',
    items: { type: 'object', required: ['resourceType'], properties: { resourceType: { type: 'string' } } },
  },
  extension: anyExtensions,
  contact: { type: 'array', items: { type: 'object' } },
  error: { type: 'string' },
  _id: primitiveElement,
  _status: primitiveElement,
  _end: primitiveElement,
  _reason: primitiveElement,
  _error: primitiveElement,
} as const;

const subscriptionSchema = {
  type: 'object',
  required: ['resourceType', 'criteria', 'channel'],
  properties: {
    ...keptElements,
    resourceType: { const: 'Subscription' },
    id: { type: 'string', pattern: '^[A-Za-z0-9\\-.]{1,64}$' },
    status: { enum: ['requested', 'active', 'error', 'off'] },
    criteria: { type: 'string', minLength: 1, maxLength: 2048 },
    _criteria: decidingElement,
    // An R4 instant; `checkInstant` then refuses one that names no real moment.
    end: { type: 'string' },
    reason: { type: 'string', minLength: 1, maxLength: 1024 },
    channel: {
      type: 'object',
      required: ['type'],
      properties: {
        id: { type: 'string' },
        extension: extensions,
        type: { type: 'string' },
        _type: decidingElement,
        endpoint: { type: 'string', maxLength: 2048 },
        _endpoint: primitiveElement,
        payload: { type: 'string', maxLength: 256 },
        _payload: decidingElement,
        header: { type: 'array', items: { type: 'string', maxLength: 4096 }, maxItems: 20 },
        // One entry per header, null where a header has no id or extensions.
        _header: { type: 'array', items: { ...primitiveElement, type: ['object', 'null'] }, maxItems: 20 },
      },
    },
  },
} as const;

// verbose: a refusal's `parentSchema` carries the `title` of the type it names.
const ajv = new Ajv({ strict: false, allErrors: false, verbose: true });
const validateSubscription = ajv.compile<SubscriptionJson>(subscriptionSchema);

/** A resource type of R4: anything else could never match a change HealthLake reports. */
const isResourceType = (name: string): boolean => R4_RESOURCE_TYPES.has(name);
const FHIR_ID = /^[A-Za-z0-9\-.]{1,64}$/;
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}$/;
/**
 * Headers the broker owns: hop-by-hop, framing, and the signature it computes itself. Any
 * `Content-*` header describes the body the broker writes (a `Content-Encoding: gzip` on a plain
 * body would make every receiver refuse every delivery), and `Webhook-*` is the Standard Webhooks
 * namespace: both prefixes are refused whole.
 */
const FORBIDDEN_HEADER_PREFIXES = ['content-', 'webhook-'];
const FORBIDDEN_HEADERS = new Set([
  'host',
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'expect',
]);
const JSON_PAYLOADS = new Set(['application/fhir+json', 'application/json']);
/** RFC 9110's token and quoted-string: no control characters, so no CR/LF. */
const TOKEN = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]+";
const QUOTED_STRING = '"(?:[\\t !#-\\[\\]-~]|\\\\[\\t -~])*"';
/** RFC 9110's media-type: `type/subtype *( OWS ";" OWS [ name=value ] )`, trimmed. */
const MEDIA_TYPE = new RegExp(
  `^[ \\t]*${TOKEN}/${TOKEN}(?:[ \\t]*;(?:[ \\t]*${TOKEN}=(?:${TOKEN}|${QUOTED_STRING}))?)*[ \\t]*$`,
);
const MAX_HEARTBEAT_SECONDS = 24 * 60 * 60;
/** 60 s: longer than any sane webhook handler; keeps a slow endpoint from pinning a connection. */
const MAX_TIMEOUT_SECONDS = 60;
const MAX_MAX_COUNT = 1000;
/**
 * 64 KiB: the most of a client's Subscription the broker keeps, well inside a DynamoDB item's
 * 400 KB with the broker's own attributes beside it, so both stores take the same Subscriptions
 * (a 500 KB one had been a 201 on SQLite and a 500 on DynamoDB).
 */
const MAX_STORED_BYTES = 64 * 1024;
/**
 * The most resource types one Subscription may watch (every type, `*`, counts as one). The
 * DynamoDB store writes a subscription in one transaction (at most 100 items and 4 MB) with an
 * index item per type, each a copy of the whole `match`: an update to other types deletes the old
 * items and puts the new beside the subscription and the version it replaced (a create: its owner's
 * count), at most 2 × 40 + 2 items, and the copies stay within MAX_MATCH_COPIES_BYTES (2.5 MiB). Refused in parsing, on both stores
 * alike: SQLite had taken with a 201 what DynamoDB failed with a 500.
 */
export const MAX_RESOURCE_TYPES = 40;
/**
 * The most all copies of a `match` (one per type) may come to: 40 at the stored-size cap. A match
 * can be half as large again as the filters it comes from (`_id=a,b` is `["a","b"]`), so 40 types
 * with some 17,000 short ids passed that cap and still came to more than DynamoDB's 4 MB.
 */
const MAX_MATCH_COPIES_BYTES = MAX_RESOURCE_TYPES * MAX_STORED_BYTES;
export const WEBHOOK_SECRET_PREFIX = 'whsec_';

/** The elements of an R4 Subscription and of its channel; `_name` siblings are allowed for the primitive ones. */
const ELEMENTS = {
  Subscription: {
    all: new Set([
      ...['resourceType', 'id', 'meta', 'implicitRules', 'language', 'text', 'contained', 'extension'],
      ...['modifierExtension', 'status', 'contact', 'end', 'reason', 'criteria', 'error', 'channel'],
    ]),
    primitive: new Set(['id', 'implicitRules', 'language', 'status', 'end', 'reason', 'criteria', 'error']),
  },
  'Subscription.channel': {
    all: new Set(['id', 'extension', 'modifierExtension', 'type', 'endpoint', 'payload', 'header']),
    primitive: new Set(['type', 'endpoint', 'payload', 'header']),
  },
} as const;

/**
 * Fails closed on what the broker would otherwise store without understanding: elements R4 does
 * not define (an unknown `note` of any size would be kept and served back), and modifier
 * extensions, which R4 says a system that does not know them SHALL refuse.
 */
function checkElements(input: unknown): void {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw new BrokerError('INVALID_RESOURCE', 'The body must be a Subscription resource (a JSON object)');
  }
  const type = (input as { resourceType?: unknown }).resourceType;
  if (type !== 'Subscription') {
    const got = typeof type === 'string' ? ` (got ${type.slice(0, 64)})` : '';
    throw new BrokerError('INVALID_RESOURCE', `resourceType must be Subscription${got}`, {
      expression: 'Subscription.resourceType',
    });
  }
  const channel = (input as { channel?: unknown }).channel;
  const levels: [keyof typeof ELEMENTS, unknown][] = [
    ['Subscription', input],
    ['Subscription.channel', channel],
  ];
  for (const [path, value] of levels) {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) continue;
    const known = ELEMENTS[path];
    for (const name of Object.keys(value)) {
      const element = name.startsWith('_') ? name.slice(1) : name;
      if (name.startsWith('_') ? known.primitive.has(element) : known.all.has(name)) continue;
      throw new BrokerError('INVALID_RESOURCE', `${path}.${name.slice(0, 64)} is not an element of an R4 ${path}`, {
        expression: `${path}.${name.slice(0, 64)}`,
      });
    }
    const modifiers = (value as { modifierExtension?: unknown }).modifierExtension;
    if (modifiers === undefined || (Array.isArray(modifiers) && modifiers.length === 0)) continue;
    // Not a list is not FHIR; stored, it would be served back as a modifier all the same.
    if (!Array.isArray(modifiers)) {
      throw new BrokerError('INVALID_RESOURCE', `${path}.modifierExtension must be an array of Extension`, {
        expression: `${path}.modifierExtension`,
      });
    }
    const url = (modifiers[0] as { url?: unknown } | null)?.url;
    throw new BrokerError(
      'UNSUPPORTED_MODIFIER',
      `${path}.modifierExtension${typeof url === 'string' ? ` ${url.slice(0, 200)}` : ''} is not understood by this broker, so the Subscription cannot be honoured`,
      { expression: `${path}.modifierExtension` },
    );
  }
}

/** Whether a Subscription resource has its R4 `reason` (1..1): a value, or `_reason` extensions. */
export function hasReason(resource: FhirResource): boolean {
  if (resource.reason !== undefined) return true;
  const extension = (resource._reason as { extension?: unknown } | undefined)?.extension;
  return Array.isArray(extension) && extension.length > 0;
}

/**
 * R4 and the backport Subscription profile make `reason` 1..1: kept without one, a Subscription is
 * served back invalid. Asked of creates, and of updates to a subscription that has one (one stored
 * before the broker asked for it may still be updated as read, to turn it off for one).
 */
export function requireReason(resource: FhirResource): void {
  if (hasReason(resource)) return;
  throw new BrokerError('INVALID_RESOURCE', 'Subscription.reason is required (R4: 1..1): say what it is for', {
    expression: 'Subscription.reason',
  });
}

/**
 * `search`: the search parameters content filters may use; absent when the broker is not set up to
 * read resources from the FHIR server (`BROKER_FHIR_READ`), and such filters are then refused.
 */
export function parseSubscription(
  input: unknown,
  topics: TopicCatalog,
  search?: SearchParameterCatalog,
): SubscriptionSpec {
  checkElements(input);
  if (!validateSubscription(input)) {
    const e = validateSubscription.errors?.[0];
    // FHIRPath, as `expression` is: `/contact/0` is `Subscription.contact[0]`.
    const where = `Subscription${(e?.instancePath ?? '').replace(/\/(\d+)(?=\/|$)/g, '[$1]').replaceAll('/', '.')}`;
    // Closed: the primitives' `_name` objects (R4 Element: id and extension), Coding and Narrative.
    if (e?.keyword === 'additionalProperties') {
      const name = `${where}.${String(e.params.additionalProperty).slice(0, 64)}`;
      const type = (e.parentSchema as { title?: string } | undefined)?.title ?? 'Element';
      throw new BrokerError('INVALID_RESOURCE', `${name} is not an element of an R4 ${type}`, { expression: name });
    }
    const missing = e?.keyword === 'required' ? ` (missing ${String(e.params.missingProperty)})` : '';
    throw new BrokerError('INVALID_RESOURCE', `${where} ${e?.message ?? 'is invalid'}${missing}`, {
      expression: where,
    });
  }
  const sub = input;
  if (sub.end !== undefined) checkInstant(sub.end, 'Subscription.end');
  const isTopic = /^https?:\/\//.test(sub.criteria);
  const kind: SubscriptionKind = isTopic ? 'topic' : 'classic';
  const match = isTopic ? topicMatch(sub, topics, search) : classicMatch(sub, search);
  const channel = parseChannel(sub, kind);
  const webhookSecret = parseSecret(sub.channel.extension);
  checkNothingEmpty(sub);
  const askedStatus = sub.status as SubscriptionStatus | undefined;
  const resource = storedResource(sub, kind, channel);
  const bytes = storedSize(resource);
  if (bytes > MAX_STORED_BYTES) {
    throw new BrokerError(
      'PAYLOAD_TOO_LARGE',
      `The Subscription is ${bytes} bytes as stored; at most ${MAX_STORED_BYTES} are kept (contact, contained and extensions count)`,
      { expression: 'Subscription' },
    );
  }
  return {
    kind,
    topic: sub.criteria,
    match,
    channel,
    ...(webhookSecret === undefined ? {} : { webhookSecret }),
    ...(askedStatus === undefined ? {} : { askedStatus }),
    ...(sub.end === undefined ? {} : { end: sub.end }),
    resource,
  };
}

/** A value met walking a body, and where: its path is spelt out only for the one refused. */
interface Visit {
  readonly value: unknown;
  readonly parent?: Visit;
  readonly key?: string | number;
}

/**
 * R4 JSON has no empty objects, arrays or strings (json.html: "Omit a property if it is empty";
 * ele-1): one sent would be stored and served back so. Anywhere in the body, `contained` and
 * extensions included; `null`s stand in a primitive array's `_name` list. After the checks that
 * name what an empty value means (an empty `endpoint` is `INVALID_ENDPOINT`). A loop, not
 * recursion: a body nested deeper than the stack is refused as such when it is measured.
 */
function checkNothingEmpty(sub: SubscriptionJson): void {
  const stack: Visit[] = [{ value: sub }];
  for (let visit = stack.pop(); visit !== undefined; visit = stack.pop()) {
    const { value } = visit;
    let empty: string | undefined;
    if (value === '') empty = 'strings';
    else if (Array.isArray(value)) {
      if (value.length === 0) empty = 'arrays';
      for (let i = value.length - 1; i >= 0; i--) stack.push({ value: value[i], parent: visit, key: i });
    } else if (typeof value === 'object' && value !== null) {
      const keys = Object.keys(value);
      if (keys.length === 0) empty = 'objects';
      for (let i = keys.length - 1; i >= 0; i--) {
        const key = keys[i] as string;
        stack.push({ value: (value as Record<string, unknown>)[key], parent: visit, key });
      }
    }
    if (empty === undefined) continue;
    const path = pathOf(visit);
    throw new BrokerError('INVALID_RESOURCE', `${path} is empty: R4 JSON has no empty ${empty}`, {
      expression: path,
    });
  }
}

/**
 * `value` without empty arrays, objects and strings, which R4 JSON has none of: brokers before
 * 2026-11-29 stored those a client sent, and a read serves this, so that a client can PUT back
 * what it read (the check above refuses them now). In a primitive's `_name` list an emptied entry
 * becomes `null`, keeping the list in step with its values. Undefined when nothing is left; the
 * value itself (no copy) when nothing in it is empty.
 */
export function withoutEmpty(value: unknown, stepList = false): unknown {
  if (value === '') return undefined;
  if (Array.isArray(value)) {
    let changed = false;
    const kept: unknown[] = [];
    for (const item of value) {
      const v = withoutEmpty(item);
      if (v !== item) changed = true;
      if (v !== undefined) kept.push(v);
      else if (stepList) kept.push(null);
    }
    if (kept.length === 0 || (stepList && kept.every((v) => v === null))) return undefined;
    return changed ? kept : value;
  }
  if (typeof value !== 'object' || value === null) return value;
  let changed = false;
  const kept: Record<string, unknown> = {};
  for (const [key, item] of Object.entries(value)) {
    const v = withoutEmpty(item, key.startsWith('_') && Array.isArray(item));
    if (v !== item) changed = true;
    if (v !== undefined) kept[key] = v;
  }
  if (Object.keys(kept).length === 0) return undefined;
  return changed ? kept : value;
}

function pathOf(visit: Visit): string {
  let path = '';
  for (let v: Visit | undefined = visit; v?.key !== undefined; v = v.parent) {
    path = typeof v.key === 'number' ? `[${v.key}]${path}` : `.${v.key.slice(0, 64)}${path}`;
  }
  return `Subscription${path}`;
}

/** An R4 `instant`: to the second, with a zone. */
const INSTANT = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:Z|[+-](\d{2}):(\d{2}))$/;
const DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
type Fields = [number, number, number, number, number, number];

/**
 * Refuses an instant that names no real moment. `Date.parse` rolls `2099-02-30` over to March 2
 * (stored as written, it would end on another day than the one shown) and makes `2099-13-01` NaN
 * (which reads as an `end` that "has passed").
 */
function checkInstant(value: string, expression: string): void {
  const problem = instantProblem(value);
  if (problem === undefined) return;
  const shown = JSON.stringify(value.slice(0, 64));
  throw new BrokerError('INVALID_RESOURCE', `${expression} ${shown} is not a valid instant: ${problem}`, {
    expression,
  });
}

/** Why `value` is not a valid R4 instant, or undefined when it is one. */
export function instantProblem(value: string): string | undefined {
  const m = INSTANT.exec(value);
  if (m === null) return 'expected YYYY-MM-DDThh:mm:ss (optionally .fff) then Z or +hh:mm / -hh:mm';
  const [year, month, day, hours, minutes, seconds] = [1, 2, 3, 4, 5, 6].map((i) => Number(m[i])) as Fields;
  if (year === 0) return 'there is no year 0000';
  const leap = year % 4 === 0 && (year % 100 !== 0 || year % 400 === 0);
  const days = month === 2 && leap ? 29 : DAYS_IN_MONTH[month - 1];
  if (days === undefined) return `there is no month ${m[2]}`;
  if (day < 1 || day > days) return `there is no day ${m[3]} in ${m[1]}-${m[2]}`;
  if (hours > 23) return `hour ${m[4]} is not 00–23`;
  if (minutes > 59) return `minute ${m[5]} is not 00–59`;
  if (seconds > 59) return `second ${m[6]} is not 00–59`;
  if (m[8] !== undefined) {
    const offset = Number(m[8]) * 60 + Number(m[9]);
    if (Number(m[9]) > 59 || offset > 14 * 60) return `offset ${value.slice(-6)} is not between -14:00 and +14:00`;
  }
  return undefined;
}

/** Bytes of the resource as stored; a nesting too deep to serialize is refused, not a 500. */
function storedSize(resource: FhirResource): number {
  try {
    return Buffer.byteLength(JSON.stringify(resource));
  } catch (err) {
    if (!(err instanceof RangeError)) throw err;
    throw new BrokerError('INVALID_RESOURCE', 'The Subscription is nested too deeply to store', {
      expression: 'Subscription',
    });
  }
}

function topicMatch(
  sub: SubscriptionJson,
  topics: TopicCatalog,
  search: SearchParameterCatalog | undefined,
): MatchSpec {
  const topic = topics.byCanonical(sub.criteria);
  if (topic === undefined) {
    const bar = sub.criteria.indexOf('|');
    const unversioned = bar === -1 ? undefined : topics.byUrl(sub.criteria.slice(0, bar));
    const offered =
      unversioned?.version === undefined ? 'has no version' : `is offered at version ${unversioned.version} only`;
    throw new BrokerError(
      'UNKNOWN_TOPIC',
      unversioned === undefined
        ? `Unknown topic ${sub.criteria}; see GET /fhir/SubscriptionTopic`
        : `Unknown topic version ${sub.criteria}: ${unversioned.url} ${offered}; name it without |version to take the one offered`,
      { expression: 'Subscription.criteria' },
    );
  }
  checkExtensions(sub._criteria?.extension, TOPIC_CRITERIA_EXTENSIONS);
  const filters: string[] = [];
  for (const ext of sub._criteria?.extension ?? []) {
    if (typeof ext.valueString !== 'string' || ext.valueString.trim() === '') {
      throw new BrokerError('INVALID_RESOURCE', 'backport-filter-criteria needs a valueString', {
        expression: 'Subscription._criteria.extension',
      });
    }
    filters.push(ext.valueString.trim());
  }
  return applyFilters(topic, filters, search);
}

/** Each filter is `[Type]?param=value[&param=value]` or `param=value`; all filters must hold (AND). */
function applyFilters(
  topic: TopicDefinition,
  filters: readonly string[],
  search: SearchParameterCatalog | undefined,
): MatchSpec {
  let types: readonly string[] | '*' = topic.resourceTypes;
  let ids: Set<string> | undefined;
  const content: { filter: string; name: string; value: string }[] = [];
  for (const filter of filters) {
    const q = filter.indexOf('?');
    const prefix = q === -1 ? (filter.includes('=') ? '' : filter) : filter.slice(0, q);
    const query = q === -1 ? (filter.includes('=') ? filter : '') : filter.slice(q + 1);
    const scope = prefix === '' || prefix === 'Resource' ? '*' : prefix;
    if (scope !== '*') {
      if (!isResourceType(scope)) throw unsupportedFilter(filter, `${scope} is not a resource type`);
      if (types !== '*' && !types.includes(scope)) {
        throw unsupportedFilter(filter, `topic ${topic.url} does not trigger on ${scope}`);
      }
      types = types === '*' ? [scope] : types.filter((t) => t === scope);
    }
    for (const pair of query.split('&').filter((p) => p !== '')) {
      const eq = pair.indexOf('=');
      const bad = () => unsupportedFilter(filter, 'malformed percent-encoding');
      const name = decodeOr(eq === -1 ? pair : pair.slice(0, eq), bad);
      const value = eq === -1 ? '' : decodeOr(pair.slice(eq + 1), bad);
      if (!topicAllows(topic, scope, name.split(':')[0] as string)) {
        throw unsupportedFilter(
          filter,
          `${name} is not a filter of topic ${topic.url} for ${scope === '*' ? 'its resources' : scope} (canFilterBy: ${describeFilters(topic)})`,
        );
      }
      if (name !== '_type' && name !== '_id') {
        if (search === undefined) throw unsupportedFilter(filter, contentUnreadable(name));
        content.push({ filter, name, value });
        continue;
      }
      const values = value.split(',').filter((v) => v !== '');
      if (values.length === 0) throw unsupportedFilter(filter, `${name} needs a value`);
      if (name === '_type') {
        for (const v of values) if (!isResourceType(v)) throw unsupportedFilter(filter, `${v} is not a resource type`);
        types = types === '*' ? values : types.filter((t) => values.includes(t));
      } else {
        for (const v of values) if (!FHIR_ID.test(v)) throw unsupportedFilter(filter, `${v} is not a FHIR id`);
        ids = ids === undefined ? new Set(values) : new Set(values.filter((v) => ids?.has(v)));
      }
    }
  }
  if (types !== '*' && types.length === 0) {
    throw unsupportedFilter(filters.join(' & '), 'the filters exclude every resource type of the topic');
  }
  if (ids !== undefined && ids.size === 0) {
    throw unsupportedFilter(filters.join(' & '), 'the _id filters exclude every resource');
  }
  checkContentCount(content.length, 'Subscription._criteria.extension');
  const contentFilters = content.map(({ filter, name, value }) => {
    if (types === '*' || types.length !== 1) {
      throw unsupportedFilter(
        filter,
        `${name} is decided on the resource's content, which needs a single resource type: write the filter as Type?${name}=…`,
      );
    }
    return contentFilterOr(types[0] as string, name, value, search as SearchParameterCatalog, (why) =>
      unsupportedFilter(filter, why),
    );
  });
  const match: MatchSpec = {
    resourceTypes: types,
    interactions: topic.interactions,
    ...(ids === undefined ? {} : { ids: [...ids] }),
    ...(contentFilters.length === 0 ? {} : { content: contentFilters }),
  };
  checkCopies(topic, match, filters.length === 0 ? 'Subscription.criteria' : 'Subscription._criteria.extension');
  return match;
}

/** Refuses a match whose copies, one per resource type, a DynamoDB transaction could not write. */
function checkCopies(topic: TopicDefinition, match: MatchSpec, expression: string): void {
  const copies = match.resourceTypes === '*' ? 1 : new Set(match.resourceTypes).size;
  if (copies > MAX_RESOURCE_TYPES) {
    const instead =
      topic.resourceTypes === '*' ? 'drop _type to watch every resource type, or name fewer' : 'name fewer with _type';
    throw new BrokerError(
      'UNSUPPORTED_FILTER',
      `The Subscription would watch ${copies} resource types; at most ${MAX_RESOURCE_TYPES} are allowed: ${instead}`,
      { expression },
    );
  }
  const bytes = Buffer.byteLength(JSON.stringify(match));
  if (copies * bytes > MAX_MATCH_COPIES_BYTES) {
    throw new BrokerError(
      'UNSUPPORTED_FILTER',
      `The filters come to ${bytes} bytes as kept, once for each of the ${copies} resource types: more than the ${MAX_MATCH_COPIES_BYTES} bytes allowed in all; name fewer types or fewer ids`,
      { expression },
    );
  }
}

function topicAllows(topic: TopicDefinition, scope: string, name: string): boolean {
  if (topic.filters.get('*')?.has(name)) return true;
  if (scope !== '*') return topic.filters.get(scope)?.has(name) ?? false;
  // An unscoped filter on a single-type topic applies to that type.
  return topic.resourceTypes !== '*' && topic.resourceTypes.every((t) => topic.filters.get(t)?.has(name));
}

function describeFilters(topic: TopicDefinition): string {
  const parts = [...topic.filters].map(
    ([type, params]) => `${type === '*' ? 'Resource' : type}: ${[...params].join(', ')}`,
  );
  return parts.length === 0 ? 'none' : parts.join('; ');
}

/**
 * Extensions the broker honours on each element that decides what is delivered, and the code that
 * refuses any other there. Ignoring one would deliver something other than what the client asked
 * for: a filter under a misspelt or cross-version URL (`hl7.org/fhir/5.0/...`) would widen the
 * subscription to every change of its topic. Elsewhere (`Subscription.extension`, `_reason`, ...)
 * extensions only inform, and are kept as sent.
 */
interface KnownExtensions {
  readonly element: string;
  readonly urls: readonly string[];
  /**
   * Those of `urls` that may repeat; any other takes one value, and a second copy is refused, not
   * read as the first (two heartbeat periods, two secrets: the broker cannot tell which was meant).
   */
  readonly repeatable?: readonly string[];
  readonly code: ErrorCode;
  readonly expression: string;
}

/** Several filters all hold (the IG's backport-filter-criteria is 0..*): they are ANDed. */
const TOPIC_CRITERIA_EXTENSIONS: KnownExtensions = {
  element: 'Subscription.criteria',
  urls: [BACKPORT_EXT.filterCriteria],
  repeatable: [BACKPORT_EXT.filterCriteria],
  code: 'UNSUPPORTED_FILTER',
  expression: 'Subscription._criteria.extension',
};
/** A classic Subscription filters in its criteria string: a backport-filter-criteria there would go unread. */
const CLASSIC_CRITERIA_EXTENSIONS: KnownExtensions = {
  ...TOPIC_CRITERIA_EXTENSIONS,
  element: 'classic Subscription.criteria',
  urls: [],
};
/**
 * The code systems of the standard channel types a backport-channel-type coding may restate `type` in:
 * R5's (rest-hook, websocket, email, message) and R4's own, which `Subscription.channel.type` is bound to.
 */
const CHANNEL_TYPE_SYSTEMS: readonly unknown[] = [
  'http://terminology.hl7.org/CodeSystem/subscription-channel-type',
  'http://hl7.org/fhir/subscription-channel-type',
];
/** backport-channel-type only as a restatement of `type` (see parseChannel); one copy. */
const CHANNEL_TYPE_EXTENSIONS: KnownExtensions = {
  element: 'Subscription.channel.type',
  urls: [BACKPORT_EXT.channelType],
  code: 'UNSUPPORTED_CHANNEL',
  expression: 'Subscription.channel._type',
};
const PAYLOAD_EXTENSIONS: KnownExtensions = {
  element: 'Subscription.channel.payload',
  urls: [BACKPORT_EXT.payloadContent],
  code: 'UNSUPPORTED_CONTENT',
  expression: 'Subscription.channel._payload',
};
const CHANNEL_EXTENSIONS: KnownExtensions = {
  element: 'Subscription.channel',
  urls: [BACKPORT_EXT.heartbeatPeriod, BACKPORT_EXT.timeout, BACKPORT_EXT.maxCount, BROKER_EXT.webhookSecret],
  code: 'UNSUPPORTED_CHANNEL',
  expression: 'Subscription.channel.extension',
};

function checkExtensions(exts: readonly Extension[] | undefined, known: KnownExtensions): void {
  const stray = exts?.find((e) => !known.urls.includes(e.url));
  if (stray !== undefined) {
    const names = known.urls.map((u) => u.split('/').pop()).join(', ') || 'none';
    throw new BrokerError(
      known.code,
      `Extension ${stray.url.slice(0, 200)} on ${known.element} cannot be honoured: the broker does not understand it there (understood: ${names})`,
      { expression: known.expression },
    );
  }
  const seen = new Set<string>();
  for (const { url } of exts ?? []) {
    if (!seen.has(url) || known.repeatable?.includes(url)) {
      seen.add(url);
      continue;
    }
    throw new BrokerError(
      known.code,
      `Extension ${url} appears more than once on ${known.element}; it takes a single value, so send one copy`,
      { expression: known.expression },
    );
  }
}

/**
 * Content filters one Subscription may hold: each is decided on every candidate event, so a client
 * must not be able to make one event cost thousands of evaluations.
 */
export const MAX_CONTENT_FILTERS = 20;

function checkContentCount(count: number, expression: string): void {
  if (count > MAX_CONTENT_FILTERS) {
    throw new BrokerError(
      expression === 'Subscription.criteria' ? 'UNSUPPORTED_CRITERIA' : 'UNSUPPORTED_FILTER',
      `The Subscription has ${count} content filters (search parameters other than _id and _type); at most ${MAX_CONTENT_FILTERS} are allowed`,
      { expression },
    );
  }
}

/** Why a content filter is refused by a broker that does not read resources. */
function contentUnreadable(name: string): string {
  return `${name} is decided on the resource's content, which a CloudTrail event does not carry, and this broker is not set up to read it from the FHIR server (BROKER_FHIR_READ)`;
}

function contentFilterOr(
  type: string,
  name: string,
  value: string,
  search: SearchParameterCatalog,
  fail: (why: string) => BrokerError,
): ContentFilter {
  try {
    return parseContentFilter(type, name, value, search);
  } catch (err) {
    if (err instanceof FilterError) throw fail(err.message);
    throw err;
  }
}

function unsupportedFilter(filter: string, why: string): BrokerError {
  return new BrokerError('UNSUPPORTED_FILTER', `Filter "${filter}" cannot be honoured: ${why}`, {
    expression: 'Subscription._criteria.extension',
  });
}

/**
 * Classic R4 criteria: `Type`, `Type?_id=a,b`, and, when the broker reads resources from the FHIR
 * server, any search parameter of the type it can evaluate (`Observation?patient=Patient/1&code=…`).
 */
function classicMatch(sub: SubscriptionJson, search: SearchParameterCatalog | undefined): MatchSpec {
  checkExtensions(sub._criteria?.extension, CLASSIC_CRITERIA_EXTENSIONS);
  const criteria = sub.criteria.trim();
  const q = criteria.indexOf('?');
  const type = q === -1 ? criteria : criteria.slice(0, q);
  if (!isResourceType(type)) {
    throw new BrokerError('UNSUPPORTED_CRITERIA', `Criteria "${criteria}": ${type} is not a resource type`, {
      expression: 'Subscription.criteria',
    });
  }
  let ids: string[] | undefined;
  const content: ContentFilter[] = [];
  for (const pair of (q === -1 ? '' : criteria.slice(q + 1)).split('&').filter((p) => p !== '')) {
    const eq = pair.indexOf('=');
    const bad = () =>
      new BrokerError('UNSUPPORTED_CRITERIA', `Criteria "${criteria}": malformed percent-encoding`, {
        expression: 'Subscription.criteria',
      });
    const name = decodeOr(eq === -1 ? pair : pair.slice(0, eq), bad);
    const raw = eq === -1 ? '' : decodeOr(pair.slice(eq + 1), bad);
    const values = raw.split(',').filter((v) => v !== '');
    if (name !== '_id') {
      const fail = (why: string) =>
        new BrokerError('UNSUPPORTED_CRITERIA', `Criteria "${criteria}": ${why}`, {
          expression: 'Subscription.criteria',
        });
      if (search === undefined) throw fail(contentUnreadable(name));
      content.push(contentFilterOr(type, name, raw, search, fail));
      continue;
    }
    if (values.length === 0 || !values.every((v) => FHIR_ID.test(v))) {
      throw new BrokerError('UNSUPPORTED_CRITERIA', `Criteria "${criteria}": _id needs FHIR ids`, {
        expression: 'Subscription.criteria',
      });
    }
    ids = ids === undefined ? values : ids.filter((v) => values.includes(v));
  }
  if (ids !== undefined && ids.length === 0) {
    throw new BrokerError('UNSUPPORTED_CRITERIA', `Criteria "${criteria}": the _id values exclude every resource`, {
      expression: 'Subscription.criteria',
    });
  }
  checkContentCount(content.length, 'Subscription.criteria');
  return {
    resourceTypes: [type],
    interactions: [...INTERACTIONS],
    ...(ids === undefined ? {} : { ids }),
    ...(content.length === 0 ? {} : { content }),
  };
}

function decodeOr(text: string, fail: () => BrokerError): string {
  try {
    return decodeURIComponent(text);
  } catch {
    throw fail();
  }
}

function parseChannel(sub: SubscriptionJson, kind: SubscriptionKind): Channel {
  const ch = sub.channel;
  if (ch.type !== 'rest-hook' && ch.type !== 'websocket') {
    throw new BrokerError(
      'UNSUPPORTED_CHANNEL',
      `Channel type ${ch.type} is not supported; use rest-hook or websocket`,
      {
        expression: 'Subscription.channel.type',
      },
    );
  }
  // A backport-channel-type extension names the channel the client means (the IG's
  // subscription-zulip example: `type` rest-hook, `_type` zulip): delivering by `type` regardless
  // would send webhooks to an endpoint that expects something else. One that names `type` itself in
  // R5's or R4's code system (as some clients send for every Subscription) says nothing more, and is kept.
  const custom = ch._type?.extension?.find((e) => e.url === BACKPORT_EXT.channelType);
  const coding = custom?.valueCoding as { system?: unknown; code?: unknown } | undefined;
  if (custom !== undefined && !(CHANNEL_TYPE_SYSTEMS.includes(coding?.system) && coding?.code === ch.type)) {
    const code = coding?.code;
    throw new BrokerError(
      'UNSUPPORTED_CHANNEL',
      `Custom channel type ${typeof code === 'string' ? code.slice(0, 64) : '(no code)'} (backport-channel-type) is not supported; use rest-hook or websocket without it`,
      { expression: 'Subscription.channel._type' },
    );
  }
  checkExtensions(ch._type?.extension, CHANNEL_TYPE_EXTENSIONS);
  checkExtensions(ch._payload?.extension, PAYLOAD_EXTENSIONS);
  checkExtensions(ch.extension, CHANNEL_EXTENSIONS);
  const type: ChannelType = ch.type;
  if (type === 'rest-hook' && (ch.endpoint === undefined || ch.endpoint === '')) {
    throw new BrokerError('INVALID_ENDPOINT', 'A rest-hook channel needs channel.endpoint', {
      expression: 'Subscription.channel.endpoint',
    });
  }
  // Sent as the Content-Type of every delivery: all of it must be a media type, or no request
  // could carry it (a CR/LF after the `;` had been stored, and every attempt then failed).
  if (ch.payload !== undefined && !MEDIA_TYPE.test(ch.payload)) {
    throw new BrokerError(
      'UNSUPPORTED_CONTENT',
      `Payload ${JSON.stringify(ch.payload)} is not a media type (type/subtype, then optional ;name=value parameters)`,
      { expression: 'Subscription.channel.payload' },
    );
  }
  // Compared without parameters: `application/fhir+json;fhirVersion=4.0` is FHIR JSON.
  if (ch.payload !== undefined && !JSON_PAYLOADS.has(mediaType(ch.payload))) {
    throw new BrokerError(
      'UNSUPPORTED_CONTENT',
      `Payload ${ch.payload} is not supported; use application/fhir+json or application/json`,
      { expression: 'Subscription.channel.payload' },
    );
  }
  if (
    kind === 'classic' &&
    type === 'rest-hook' &&
    ch.payload !== undefined &&
    (ch.extension ?? []).some((e) => e.url === BACKPORT_EXT.maxCount)
  ) {
    throw new BrokerError(
      'UNSUPPORTED_CHANNEL',
      'A classic Subscription with channel.payload sends each change as its own update of the resource (PUT [endpoint]/[type]/[id]): backport-max-count does not apply; leave it out',
      { expression: 'Subscription.channel.extension' },
    );
  }
  if (kind === 'classic' && (ch.extension ?? []).some((e) => e.url === BACKPORT_EXT.heartbeatPeriod)) {
    throw new BrokerError(
      'UNSUPPORTED_CHANNEL',
      'A classic Subscription gets no heartbeats: R4 has none, and its empty POST would read as a change; use a topic-based Subscription for backport-heartbeat-period',
      { expression: 'Subscription.channel.extension' },
    );
  }
  const contentExt = ch._payload?.extension?.find((e) => e.url === BACKPORT_EXT.payloadContent);
  // A classic websocket Subscription only ever gets `ping <id>`: its payload is moot.
  const content = type === 'websocket' && kind === 'classic' ? 'empty' : parseContent(contentExt, kind, ch.payload);
  const channelExt = ch.extension ?? [];
  return {
    type,
    // A websocket channel has no endpoint: clients come to the broker's /ws.
    ...(type === 'rest-hook' ? { endpoint: ch.endpoint } : {}),
    ...(ch.payload === undefined ? {} : { payload: ch.payload }),
    content,
    headers: parseHeaders(ch.header ?? []),
    ...optionalInt(
      channelExt,
      BACKPORT_EXT.heartbeatPeriod,
      'valueUnsignedInt',
      'heartbeatPeriodSeconds',
      1,
      MAX_HEARTBEAT_SECONDS,
    ),
    ...optionalInt(channelExt, BACKPORT_EXT.timeout, 'valueUnsignedInt', 'timeoutSeconds', 1, MAX_TIMEOUT_SECONDS),
    ...optionalInt(channelExt, BACKPORT_EXT.maxCount, 'valuePositiveInt', 'maxCount', 1, MAX_MAX_COUNT),
  };
}

function parseContent(ext: Extension | undefined, kind: SubscriptionKind, payload: string | undefined): PayloadContent {
  // R4: with a payload, the resource itself goes to the endpoint (a FHIR service base, updated
  // with it); whether this client may have it is the registry's to decide (`#withContent`).
  if (kind === 'classic') return payload === undefined ? 'empty' : 'full-resource';
  if (ext === undefined) return payload === undefined ? 'empty' : 'id-only';
  const code = ext.valueCode;
  // full-resource: whether this client may have it is the registry's to decide (fullResourceFor).
  if (code === 'empty' || code === 'id-only' || code === 'full-resource') return code;
  throw new BrokerError(
    'UNSUPPORTED_CONTENT',
    `Unknown payload content ${String(code)} (empty, id-only, full-resource)`,
    {
      expression: 'Subscription.channel._payload',
    },
  );
}

/**
 * The headers as sent: a name given more than once (in any case) keeps its last value only, as an
 * HTTP client's "set" would. Inferno's Subscriptions test kit appends its own `Authorization` to
 * the tester's Subscription, which its samples already give one, and expects its own to be used.
 */
function parseHeaders(headers: readonly string[]): string[] {
  const parsed = headers.map((h, i) => {
    const colon = h.indexOf(':');
    const name = colon === -1 ? '' : h.slice(0, colon).trim();
    const value = colon === -1 ? '' : h.slice(colon + 1).trim();
    // Visible ASCII, space, tab and obs-text only: anything else undici refuses on every attempt.
    if (!HEADER_NAME.test(name) || !/^[\t\x20-\x7e\x80-\xff]*$/.test(value)) {
      // Named by position, not quoted: the entry may hold a credential, and error bodies get logged.
      throw new BrokerError('INVALID_HEADER', `channel.header[${i}] is not "Name: value"`, {
        expression: 'Subscription.channel.header',
      });
    }
    const lower = name.toLowerCase();
    if (FORBIDDEN_HEADERS.has(lower) || FORBIDDEN_HEADER_PREFIXES.some((p) => lower.startsWith(p))) {
      throw new BrokerError('INVALID_HEADER', `channel.header ${name} is set by the broker and cannot be overridden`, {
        expression: 'Subscription.channel.header',
      });
    }
    return `${name}: ${value}`;
  });
  return keptHeaders(headers).map((i) => parsed[i] as string);
}

/** Indexes of the headers sent: of a name given more than once (any case), the last. */
function keptHeaders(headers: readonly string[]): number[] {
  const names = headers.map((h) =>
    h
      .slice(0, Math.max(h.indexOf(':'), 0))
      .trim()
      .toLowerCase(),
  );
  const last = new Map(names.map((name, i) => [name, i]));
  return names.flatMap((name, i) => (last.get(name) === i ? [i] : []));
}

function optionalInt<K extends string>(
  exts: readonly Extension[],
  url: string,
  valueKey: 'valueUnsignedInt' | 'valuePositiveInt',
  key: K,
  min: number,
  max: number,
): { [P in K]?: number } {
  const ext = exts.find((e) => e.url === url);
  if (ext === undefined) return {};
  const v = ext[valueKey];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new BrokerError('INVALID_RESOURCE', `${url.split('/').pop()} needs ${valueKey} between ${min} and ${max}`, {
      expression: 'Subscription.channel.extension',
    });
  }
  return { [key]: v } as { [P in K]?: number };
}

function parseSecret(exts: readonly Extension[] | undefined): string | undefined {
  const ext = exts?.find((e) => e.url === BROKER_EXT.webhookSecret);
  if (ext === undefined) return undefined;
  const v = ext.valueString;
  if (typeof v !== 'string' || !isWebhookSecret(v)) {
    throw new BrokerError('INVALID_SECRET', 'webhook-secret must be whsec_ followed by base64 of 24 to 64 bytes', {
      expression: 'Subscription.channel.extension',
    });
  }
  return v;
}

export function isWebhookSecret(v: string): boolean {
  if (!v.startsWith(WEBHOOK_SECRET_PREFIX)) return false;
  const b64 = v.slice(WEBHOOK_SECRET_PREFIX.length);
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) return false;
  const bytes = Buffer.from(b64, 'base64').length;
  return bytes >= 24 && bytes <= 64;
}

/**
 * The client's resource minus what the broker owns (secret, status, error, id, and of `meta` all
 * but the profiles, security labels and tags). A topic-based one claims the backport profile, which
 * requires `channel.payload` and its content extension: a default the client left out is written
 * in as the broker applies it (no payload: `empty` content in `application/fhir+json` bundles; a
 * payload without content: `id-only`).
 */
function storedResource(sub: SubscriptionJson, kind: SubscriptionKind, parsed: Channel): FhirResource {
  const content = parsed.content;
  const { id: _id, meta: sentMeta, status: _status, error: _error, ...rest } = sub;
  const meta = storedMeta(sentMeta, kind);
  const channelExt = (sub.channel.extension ?? []).filter((e) => e.url !== BROKER_EXT.webhookSecret);
  const { extension: _ext, ...channel } = sub.channel;
  // A header name given more than once: stored with its last value only, as sent (see
  // parseHeaders), and the `_header` elements that went with the ones dropped dropped too.
  if (channel.header !== undefined && channel.header.length !== parsed.headers.length) {
    const kept = keptHeaders(channel.header);
    const raw = channel.header;
    channel.header = kept.map((i) => raw[i] as string);
    const elements = (channel as { _header?: unknown[] })._header;
    if (elements !== undefined) (channel as { _header?: unknown[] })._header = kept.map((i) => elements[i] ?? null);
  }
  if (kind === 'topic') {
    channel.payload ??= 'application/fhir+json';
    const payloadExt = channel._payload?.extension ?? [];
    if (!payloadExt.some((e) => e.url === BACKPORT_EXT.payloadContent)) {
      channel._payload = {
        ...channel._payload,
        extension: [...payloadExt, { url: BACKPORT_EXT.payloadContent, valueCode: content }],
      };
    }
  }
  return {
    ...rest,
    resourceType: 'Subscription',
    ...(meta === undefined ? {} : { meta }),
    channel: channelExt.length === 0 ? channel : { ...channel, extension: channelExt },
  };
}

/**
 * The `meta` kept: the client's profiles, each once, and a topic-based Subscription's backport
 * profile (a classic one does not conform to it: taken off, as a topic-based one read and PUT back
 * as classic would have it), then its security labels and tags as sent. Undefined when that is nothing.
 */
function storedMeta(sent: SubscriptionJson['meta'], kind: SubscriptionKind): SubscriptionJson['meta'] {
  const own = kind === 'topic' ? [BACKPORT_PROFILE.subscription] : [];
  const profile = [...new Set([...(sent?.profile ?? []), ...own])].filter(
    (p) => kind === 'topic' || p !== BACKPORT_PROFILE.subscription,
  );
  const meta = {
    ...(profile.length === 0 ? {} : { profile }),
    ...(sent?.security === undefined ? {} : { security: sent.security }),
    ...(sent?.tag === undefined ? {} : { tag: sent.tag }),
  };
  return Object.keys(meta).length === 0 ? undefined : meta;
}

/** Whether `BROKER_FULL_RESOURCE_CLIENTS` (as `list`) lets `owner` have full resources. */
export function mayHaveFullResources(list: readonly string[] | '*', owner: string): boolean {
  return list === '*' || list.includes(owner);
}

/**
 * The content `sub`'s payloads are written with now: a full-resource subscription whose client was
 * taken off `BROKER_FULL_RESOURCE_CLIENTS` since gets id-only, even for notifications stored with
 * the resource (a retry, a backlog, `$events`).
 */
export function contentNow(
  sub: Pick<SubscriptionRecord, 'owner' | 'channel'>,
  fullResourceClients: readonly string[] | '*',
): PayloadContent {
  const { content } = sub.channel;
  return content === 'full-resource' && !mayHaveFullResources(fullResourceClients, sub.owner) ? 'id-only' : content;
}
