/**
 * One errors module. Every error the broker raises on purpose has a stable `code`
 * (documented in docs/errors.md, checked by a test) and the HTTP status it maps to.
 * The HTTP edge turns them into OperationOutcome in one place.
 */

export type IssueType =
  | 'invalid'
  | 'structure'
  | 'required'
  | 'value'
  | 'not-supported'
  | 'security'
  | 'login'
  | 'not-found'
  | 'too-long'
  | 'conflict'
  | 'exception'
  | 'transient'
  | 'processing'
  | 'business-rule';

export const ERROR_CODES = {
  BAD_JSON: { status: 400, issue: 'structure', text: 'The body is not valid JSON.' },
  INVALID_EVENT: { status: 400, issue: 'invalid', text: 'The body is not an EventBridge event or an array of them.' },
  TOO_MANY_EVENTS: { status: 413, issue: 'too-long', text: 'More events in one request than the broker accepts.' },
  INVALID_RESOURCE: { status: 400, issue: 'invalid', text: 'The resource does not have the required structure.' },
  UNKNOWN_TOPIC: {
    status: 422,
    issue: 'not-supported',
    text: 'The Subscription names a topic this broker does not offer.',
  },
  UNSUPPORTED_FILTER: { status: 422, issue: 'not-supported', text: 'A filter the broker cannot honour.' },
  UNSUPPORTED_CRITERIA: { status: 422, issue: 'not-supported', text: 'Classic criteria the broker cannot honour.' },
  UNSUPPORTED_CHANNEL: {
    status: 422,
    issue: 'not-supported',
    text: 'A channel the broker does not deliver as asked (its type, or an extension on it).',
  },
  UNSUPPORTED_MODIFIER: {
    status: 422,
    issue: 'not-supported',
    text: 'A modifier extension the broker does not understand.',
  },
  UNSUPPORTED_CONTENT: {
    status: 422,
    issue: 'not-supported',
    text: 'A payload the broker does not deliver as asked (its media type, or its content level for this client or broker).',
  },
  INVALID_ENDPOINT: { status: 422, issue: 'value', text: 'The channel endpoint is not an acceptable URL.' },
  ENDPOINT_FORBIDDEN: {
    status: 422,
    issue: 'security',
    text: 'The channel endpoint is refused: it names or resolves to a private or reserved address, or does not resolve.',
  },
  INVALID_HEADER: { status: 422, issue: 'value', text: 'A channel header is malformed or not allowed.' },
  INVALID_SECRET: { status: 422, issue: 'value', text: 'The webhook secret is not a Standard Webhooks secret.' },
  INVALID_STATUS_CHANGE: { status: 422, issue: 'business-rule', text: 'The status change is not allowed.' },
  ID_MISMATCH: { status: 400, issue: 'invalid', text: 'The resource id does not match the URL.' },
  INVALID_PARAMETER: {
    status: 400,
    issue: 'invalid',
    text: 'A parameter (in the query or a Parameters body) is invalid.',
  },
  UNAUTHORIZED: { status: 401, issue: 'login', text: 'Missing or invalid bearer token.' },
  NOT_FOUND: { status: 404, issue: 'not-found', text: 'No such resource.' },
  QUOTA_EXCEEDED: { status: 422, issue: 'business-rule', text: 'The client has as many subscriptions as it may.' },
  PRECONDITION_FAILED: {
    status: 412,
    issue: 'conflict',
    text: 'A precondition of the request (If-Match, If-None-Exist) does not hold.',
  },
  CONFLICT: { status: 409, issue: 'conflict', text: 'The resource changed while the request was being applied.' },
  UPGRADE_REQUIRED: { status: 426, issue: 'not-supported', text: 'The route is a WebSocket endpoint.' },
  METHOD_NOT_ALLOWED: { status: 405, issue: 'not-supported', text: 'The method is not allowed on this route.' },
  PAYLOAD_TOO_LARGE: { status: 413, issue: 'too-long', text: 'The body is larger than the broker accepts.' },
  NOT_ACCEPTABLE: {
    status: 406,
    issue: 'not-supported',
    text: 'The broker answers in JSON only (application/fhir+json).',
  },
  UNSUPPORTED_MEDIA_TYPE: {
    status: 415,
    issue: 'not-supported',
    text: 'The body must be application/fhir+json or application/json.',
  },
  STORE_UNAVAILABLE: { status: 503, issue: 'exception', text: 'The store could not be reached.' },
  CONTENT_UNAVAILABLE: {
    status: 503,
    issue: 'transient',
    text: 'A changed resource could not be read from the FHIR server (content filters, full-resource content).',
  },
  INTERNAL: { status: 500, issue: 'exception', text: 'An unexpected error.' },
} as const satisfies Record<string, { status: number; issue: IssueType; text: string }>;

export type ErrorCode = keyof typeof ERROR_CODES;

export class BrokerError extends Error {
  readonly code: ErrorCode;
  /** FHIRPath-ish location of the problem, e.g. `Subscription.channel.endpoint`. */
  readonly expression?: string;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; expression?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'BrokerError';
    this.code = code;
    this.expression = options?.expression;
  }

  get status(): number {
    return ERROR_CODES[this.code].status;
  }

  get issueType(): string {
    return ERROR_CODES[this.code].issue;
  }
}

export const invalid = (message: string, expression?: string): BrokerError =>
  new BrokerError('INVALID_RESOURCE', message, { expression });

export const notFound = (what: string): BrokerError => new BrokerError('NOT_FOUND', `${what} not found`);
