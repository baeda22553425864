import { Ajv } from 'ajv';
import { EVALUATED_TYPES, type SearchParameterCatalog } from './search-filter.js';
import { type FhirResource, INTERACTIONS, type Interaction } from './types.js';

/**
 * SubscriptionTopic definitions (R4B shape) the broker offers. Honoured: the triggering resource
 * type and interaction, `_id` / `_type` filters (decided on the event), and search parameters the
 * content stage decides on the resource (src/core/search-filter.ts), when the broker reads it.
 */

export const BROKER_CANONICAL_BASE = 'https://fhir-subscription-broker.org/fhir';
const STRUCTURE_DEFINITION = 'http://hl7.org/fhir/StructureDefinition/';

/** Filter parameters a topic may declare that the broker can evaluate from the event alone. */
export const EVENT_FILTER_PARAMETERS: ReadonlySet<string> = new Set(['_id', '_type']);
/** A search parameter's code, as the R4 SearchParameter definitions write them (`_tag`, `general-practitioner`). */
const SEARCH_PARAMETER_CODE = /^_?[a-z][a-z0-9-]*$/;

export interface TopicDefinition {
  readonly url: string;
  /** The business version a canonical may name after `|`; a topic without one takes no `|version`. */
  readonly version?: string;
  readonly id: string;
  /** `'*'` for a topic triggered by any resource type (`.../StructureDefinition/Resource`). */
  readonly resourceTypes: readonly string[] | '*';
  readonly interactions: readonly Interaction[];
  /** Allowed filter parameters by resource type (`'*'` key: any of the topic's types). */
  readonly filters: ReadonlyMap<string, ReadonlySet<string>>;
  readonly resource: FhirResource;
  /**
   * The resource with `canFilterBy` cut to what the event decides (`_id`, `_type`): what a broker
   * that does not read resources (no `BROKER_FHIR_READ`) offers, so a client never picks a filter
   * it would then be refused.
   */
  readonly eventOnlyResource: FhirResource;
}

const topicSchema = {
  type: 'object',
  required: ['resourceType', 'id', 'url', 'status', 'resourceTrigger'],
  properties: {
    resourceType: { const: 'SubscriptionTopic' },
    id: { type: 'string', pattern: '^[A-Za-z0-9\\-.]{1,64}$' },
    url: { type: 'string', minLength: 1 },
    version: { type: 'string', minLength: 1 },
    status: { enum: ['draft', 'active', 'retired', 'unknown'] },
    resourceTrigger: {
      type: 'array',
      minItems: 1,
      items: {
        type: 'object',
        required: ['resource'],
        properties: {
          resource: { type: 'string', minLength: 1 },
          supportedInteraction: { type: 'array', items: { enum: ['create', 'update', 'delete'] } },
        },
      },
    },
    canFilterBy: {
      type: 'array',
      items: {
        type: 'object',
        required: ['filterParameter'],
        properties: { resource: { type: 'string' }, filterParameter: { type: 'string' } },
      },
    },
  },
} as const;

interface TopicJson {
  resourceType: 'SubscriptionTopic';
  id: string;
  url: string;
  version?: string;
  status: string;
  resourceTrigger: { resource: string; supportedInteraction?: Interaction[] }[];
  canFilterBy?: { resource?: string; filterParameter: string }[];
}

const ajv = new Ajv({ strict: false });
const validateTopic = ajv.compile<TopicJson>(topicSchema);

export class InvalidTopicError extends Error {
  constructor(source: string, message: string) {
    super(`${source}: ${message}`);
    this.name = 'InvalidTopicError';
  }
}

/** Turn a resource type canonical (`http://hl7.org/fhir/StructureDefinition/Patient`) or bare name into a type. */
function resourceTypeOf(resource: string): string {
  return resource.startsWith(STRUCTURE_DEFINITION) ? resource.slice(STRUCTURE_DEFINITION.length) : resource;
}

export function parseTopic(json: unknown, source: string): TopicDefinition {
  if (!validateTopic(json)) {
    const e = validateTopic.errors?.[0];
    throw new InvalidTopicError(source, `${e?.instancePath || '(topic)'} ${e?.message ?? 'is invalid'}`);
  }
  const types = new Set<string>();
  const interactions = new Set<Interaction>();
  let anyType = false;
  for (const trigger of json.resourceTrigger) {
    const type = resourceTypeOf(trigger.resource);
    if (type === 'Resource' || type === 'DomainResource') anyType = true;
    else types.add(type);
    for (const i of trigger.supportedInteraction ?? INTERACTIONS) interactions.add(i);
  }
  const filters = new Map<string, Set<string>>();
  for (const f of json.canFilterBy ?? []) {
    // R4B's canFilterBy.modifier would narrow what a client may send; the broker would not enforce it.
    if ((f as { modifier?: unknown }).modifier !== undefined) {
      throw new InvalidTopicError(
        source,
        `canFilterBy ${f.filterParameter} has a modifier list, which the broker does not enforce; leave it out`,
      );
    }
    if (!EVENT_FILTER_PARAMETERS.has(f.filterParameter) && !SEARCH_PARAMETER_CODE.test(f.filterParameter)) {
      throw new InvalidTopicError(
        source,
        `canFilterBy ${f.filterParameter} is not a search parameter code (like patient or _tag; modifiers are the client's)`,
      );
    }
    const key = f.resource === undefined ? '*' : resourceTypeOf(f.resource);
    const normalized = key === 'Resource' || key === 'DomainResource' ? '*' : key;
    const set = filters.get(normalized) ?? new Set<string>();
    set.add(f.filterParameter);
    filters.set(normalized, set);
  }
  return {
    url: json.url,
    ...(json.version === undefined ? {} : { version: json.version }),
    id: json.id,
    resourceTypes: anyType ? '*' : [...types],
    interactions: INTERACTIONS.filter((i) => interactions.has(i)),
    filters,
    resource: json as unknown as FhirResource,
    eventOnlyResource: eventOnly(json),
  };
}

function eventOnly(json: TopicJson): FhirResource {
  const { canFilterBy, ...rest } = json;
  const kept = (canFilterBy ?? []).filter((f) => EVENT_FILTER_PARAMETERS.has(f.filterParameter));
  // R4B JSON has no empty arrays: no filter left, no canFilterBy.
  return (kept.length === 0 ? rest : { ...rest, canFilterBy: kept }) as unknown as FhirResource;
}

/** The topics the broker offers, by canonical URL (with or without `|version`). */
export class TopicCatalog {
  readonly #byUrl = new Map<string, TopicDefinition>();
  readonly #byId = new Map<string, TopicDefinition>();

  constructor(topics: readonly TopicDefinition[]) {
    for (const t of topics) {
      if (this.#byUrl.has(t.url) || this.#byId.has(t.id)) {
        throw new InvalidTopicError(t.id, `duplicate topic url or id ${t.url}`);
      }
      this.#byUrl.set(t.url, t);
      this.#byId.set(t.id, t);
    }
  }

  /**
   * The topic a canonical names: its url alone, or `url|version` with the topic's own version.
   * Any other version is a topic the broker does not offer (a client would see it named in every
   * status it gets).
   */
  byCanonical(canonical: string): TopicDefinition | undefined {
    const bar = canonical.indexOf('|');
    const topic = this.byUrl(bar === -1 ? canonical : canonical.slice(0, bar));
    return bar === -1 || topic?.version === canonical.slice(bar + 1) ? topic : undefined;
  }

  /** The topic at a canonical url, whatever version follows it. */
  byUrl(url: string): TopicDefinition | undefined {
    return this.#byUrl.get(url);
  }

  byId(id: string): TopicDefinition | undefined {
    return this.#byId.get(id);
  }

  all(): readonly TopicDefinition[] {
    return [...this.#byUrl.values()];
  }

  /**
   * What is wrong with the topics' content filters (canFilterBy beyond `_id` and `_type`) by the
   * search parameters `search` knows: a parameter a resource type does not have, or one the broker
   * cannot evaluate. Empty when all hold.
   */
  contentFilterProblems(search: SearchParameterCatalog): string[] {
    const problems: string[] = [];
    for (const t of this.all()) {
      for (const [scope, params] of t.filters) {
        const types = scope !== '*' ? [scope] : t.resourceTypes === '*' ? ['Resource'] : t.resourceTypes;
        for (const param of params) {
          if (EVENT_FILTER_PARAMETERS.has(param)) continue;
          for (const type of types) {
            const info = search.lookup(type, param);
            if (info === undefined)
              problems.push(`topic ${t.url}: canFilterBy ${param} is not a search parameter of ${type}`);
            else if (!EVALUATED_TYPES.has(info.type)) {
              problems.push(
                `topic ${t.url}: canFilterBy ${param} on ${type} is a ${info.type} parameter, which the broker does not evaluate`,
              );
            }
          }
        }
      }
    }
    return problems;
  }
}
