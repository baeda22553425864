/** Canonical URLs the broker reads and writes. */

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';

export const BACKPORT_EXT = {
  filterCriteria: `${BACKPORT}/backport-filter-criteria`,
  heartbeatPeriod: `${BACKPORT}/backport-heartbeat-period`,
  timeout: `${BACKPORT}/backport-timeout`,
  maxCount: `${BACKPORT}/backport-max-count`,
  payloadContent: `${BACKPORT}/backport-payload-content`,
  channelType: `${BACKPORT}/backport-channel-type`,
  topicCanonical: `${BACKPORT}/capabilitystatement-subscriptiontopic-canonical`,
} as const;

export const BACKPORT_PROFILE = {
  subscription: `${BACKPORT}/backport-subscription`,
  notification: `${BACKPORT}/backport-subscription-notification-r4`,
  status: `${BACKPORT}/backport-subscription-status-r4`,
} as const;

/** Extensions of FHIR R4 itself. */
export const FHIR_EXT = {
  /** On CapabilityStatement.rest: where the server takes WebSocket connections. */
  websocket: 'http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket',
} as const;

export const BROKER_BASE = 'https://fhir-subscription-broker.org/fhir';

export const BROKER_EXT = {
  webhookSecret: `${BROKER_BASE}/StructureDefinition/webhook-secret`,
  /** On CapabilityStatement.rest: the broker's WebSocket endpoint. */
  websocketUrl: `${BROKER_BASE}/StructureDefinition/websocket-url`,
  /** On each `notification-event` of a `$events` answer: how that notification's delivery stands. */
  delivery: `${BROKER_BASE}/StructureDefinition/delivery`,
} as const;

export const ERROR_CODE_SYSTEM = `${BROKER_BASE}/CodeSystem/error-code`;
