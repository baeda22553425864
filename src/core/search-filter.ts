/**
 * Content filters: stage two of matching. A CloudTrail event names a resource but carries none of
 * its content, so a filter such as `Observation?patient=Patient/123&code=http://loinc.org|8867-4`
 * is decided on the resource as the FHIR server holds it (read by the content stage, see
 * src/service/content-stage.ts), with FHIR R4 search semantics (http://hl7.org/fhir/R4/search.html):
 * several parameters are ANDed, a comma list within one is ORed.
 *
 * Pure: which parameters exist and where their values sit in a resource (the SearchParameter
 * definitions and their FHIRPath expressions) come from a `SearchParameterCatalog` the composition
 * root builds (src/content/search-parameters.ts); this module parses filters against it and compares
 * values by search parameter type. Supported: token, reference, string, date and uri parameters,
 * with the modifiers `:missing`, `:not`, `:text` (token), `:exact`, `:contains` (string), `:[type]`,
 * `:identifier` (reference), `:below`, `:above` (uri), and the date prefixes eq, ne, gt, lt, ge, le,
 * sa, eb. Anything else (number, quantity, composite, chained parameters, terminology modifiers) is
 * refused when the Subscription is registered, never ignored: a filter left out would widen what a
 * client receives.
 */

export type SearchParamType = 'token' | 'reference' | 'string' | 'date' | 'uri';

/** One search parameter of one resource type, as the catalog knows it. */
export interface SearchParameterInfo {
  /** The definition's `type` (`number`, `quantity`... are known but not evaluated). */
  readonly type: string;
  /** Resource types a reference parameter may point to (`SearchParameter.target`). */
  readonly targets: readonly string[];
}

export interface SearchParameterCatalog {
  /** `code` on `resourceType` (its own or one every resource has, such as `_tag`), if defined. */
  lookup(resourceType: string, code: string): SearchParameterInfo | undefined;
  /** The values the parameter's expression selects in `resource` (primitives or FHIR JSON objects). */
  values(resource: Readonly<Record<string, unknown>>, code: string): readonly unknown[];
}

/** A parsed filter on one parameter; kept in the Subscription's MatchSpec (JSON). */
export interface ContentFilter {
  readonly param: string;
  readonly type: SearchParamType;
  readonly modifier?: string;
  /** ORed. A date value keeps its prefix (`ge2024-01-01`). */
  readonly values: readonly string[];
  /** A reference parameter's target types (for a bare id, and the `:[type]` modifier). */
  readonly targets?: readonly string[];
}

/** Why a filter cannot be honoured; the caller turns it into a 422 naming the filter. */
export class FilterError extends Error {}

/** The search parameter types the broker evaluates. */
export const EVALUATED_TYPES: ReadonlySet<string> = new Set(['token', 'reference', 'string', 'date', 'uri']);

const MODIFIERS: Readonly<Record<SearchParamType, readonly string[]>> = {
  token: ['missing', 'not', 'text'],
  reference: ['missing', 'identifier'],
  string: ['missing', 'exact', 'contains'],
  date: ['missing'],
  uri: ['missing', 'below', 'above'],
};

const DATE_PREFIXES = ['eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb'] as const;
type DatePrefix = (typeof DATE_PREFIXES)[number];

/** Up to 100 values in one parameter: an OR list past that is a misuse, not a filter. */
const MAX_VALUES = 100;
/** A value (after decoding) longer than this is refused. */
const MAX_VALUE_CHARS = 1024;

/**
 * Parses `name[:modifier]=value` (both already percent-decoded) for `resourceType`. `_id` and
 * `_type` are stage one's and never reach here.
 */
export function parseContentFilter(
  resourceType: string,
  name: string,
  value: string,
  catalog: SearchParameterCatalog,
): ContentFilter {
  if (name.includes('.')) throw new FilterError(`chained parameters (${name}) are not supported`);
  if (name.startsWith('_has')) throw new FilterError('_has is not supported');
  const colon = name.indexOf(':');
  const param = colon === -1 ? name : name.slice(0, colon);
  const modifier = colon === -1 ? undefined : name.slice(colon + 1);
  const info = catalog.lookup(resourceType, param);
  if (info === undefined) throw new FilterError(`${param} is not a search parameter of ${resourceType}`);
  if (!EVALUATED_TYPES.has(info.type)) {
    throw new FilterError(
      `${param} is a ${info.type} parameter; the broker evaluates token, reference, string, date and uri ones`,
    );
  }
  const type = info.type as SearchParamType;
  let targets = info.targets;
  let typed = false;
  if (modifier !== undefined && !MODIFIERS[type].includes(modifier)) {
    if (type === 'reference' && targets.includes(modifier)) {
      targets = [modifier];
      typed = true;
    } else {
      const allowed = [...MODIFIERS[type], ...(type === 'reference' ? ['[type]'] : [])].map((m) => `:${m}`).join(', ');
      throw new FilterError(
        `modifier :${modifier} is not supported on ${type} parameter ${param} (supported: ${allowed})`,
      );
    }
  }
  const values = splitValues(value);
  if (values.length === 0) throw new FilterError(`${name} needs a value`);
  if (values.length > MAX_VALUES) throw new FilterError(`${name} has ${values.length} values; at most ${MAX_VALUES}`);
  for (const v of values) {
    if (v.length > MAX_VALUE_CHARS)
      throw new FilterError(`a value of ${name} is longer than ${MAX_VALUE_CHARS} characters`);
    if (modifier === 'missing') {
      if (v !== 'true' && v !== 'false') throw new FilterError(`${name} takes true or false`);
    } else if (type === 'date') {
      const problem = dateProblem(v);
      if (problem !== undefined) throw new FilterError(`${name}=${v}: ${problem}`);
    } else if (type === 'reference' && modifier !== 'identifier') {
      // `Type/id` must name a type the parameter can point to (`subject:Patient=Group/9`,
      // `patient=Group/1`): a value that can never match is a mistake, not a filter.
      const named = /^([A-Z][A-Za-z]+)\/[^/]+$/.exec(unescapeValue(v))?.[1];
      if (named !== undefined && targets.length > 0 && !targets.includes(named)) {
        throw new FilterError(`${name}=${v}: ${param} points to ${targets.join(', ')}, not ${named}`);
      }
    }
  }
  return {
    param,
    type,
    ...(modifier === undefined ? {} : { modifier: typed ? 'type' : modifier }),
    values,
    ...(type === 'reference' ? { targets } : {}),
  };
}

/** Every filter holds on `resource` (filters ANDed, each filter's values ORed). */
export function matchesContent(
  resource: Readonly<Record<string, unknown>>,
  filters: readonly ContentFilter[],
  catalog: SearchParameterCatalog,
  serverBase?: string,
): boolean {
  return filters.every((f) => matchesFilter(catalog.values(resource, f.param), f, serverBase));
}

function matchesFilter(found: readonly unknown[], f: ContentFilter, serverBase: string | undefined): boolean {
  if (f.modifier === 'missing') return f.values.some((v) => (v === 'true') === (found.length === 0));
  if (f.modifier === 'not') {
    // R4: `:not` matches what has no value equal to any of them, missing values included.
    return !f.values.some((v) => found.some((x) => tokenMatches(x, v)));
  }
  return f.values.some((v) => found.some((x) => valueMatches(x, v, f, serverBase)));
}

function valueMatches(target: unknown, value: string, f: ContentFilter, serverBase: string | undefined): boolean {
  switch (f.type) {
    case 'token':
      return f.modifier === 'text' ? tokenTextMatches(target, value) : tokenMatches(target, value);
    case 'reference':
      return f.modifier === 'identifier'
        ? isObject(target) && tokenMatches(target.identifier, value)
        : referenceMatches(target, value, f.targets ?? [], f.modifier === 'type', serverBase);
    case 'string':
      return stringsOf(target).some((s) => stringMatches(s, value, f.modifier));
    case 'date':
      return dateMatches(target, value);
    case 'uri':
      return typeof target === 'string' && uriMatches(target, value, f.modifier);
  }
}

// ---------- values ----------

/** Splits a comma list, honouring the `\,` `\|` `\$` `\\` escapes of R4 search. */
function splitValues(raw: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < raw.length; i++) {
    const ch = raw[i] as string;
    if (ch === '\\' && i + 1 < raw.length) {
      cur += ch + (raw[i + 1] as string);
      i++;
    } else if (ch === ',') {
      out.push(cur);
      cur = '';
    } else cur += ch;
  }
  out.push(cur);
  return out.filter((v) => v !== '');
}

/** Splits `system|code` at the first unescaped bar; undefined system when there is none. */
function systemAndCode(value: string): { system?: string; code: string } {
  for (let i = 0; i < value.length; i++) {
    if (value[i] === '\\') i++;
    else if (value[i] === '|')
      return { system: unescapeValue(value.slice(0, i)), code: unescapeValue(value.slice(i + 1)) };
  }
  return { code: unescapeValue(value) };
}

function unescapeValue(s: string): string {
  return s.replace(/\\([\\,|$])/g, '$1');
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

// ---------- token ----------

/** Coding, CodeableConcept, Identifier, ContactPoint, code, boolean. */
function tokenMatches(target: unknown, value: string): boolean {
  const { system, code } = systemAndCode(value);
  const pairs = tokenPairs(target);
  return pairs.some((p) => {
    if (system === undefined) return p.code === code;
    if (code === '') return p.system === system;
    if (system === '') return p.system === undefined && p.code === code;
    // A bare code (Observation.status) takes its system from its binding, which the data does not
    // carry: a system of the kinds such bindings use (FHIR's own, HL7 terminology, IETF BCP codes)
    // names it; any other (a local URL) cannot.
    return (
      p.code === code &&
      (p.system === system || (p.implicit === true && BOUND_SYSTEMS.some((s) => system.startsWith(s))))
    );
  });
}

/**
 * Where the code systems of the bindings of bare codes live: FHIR's own (`http://hl7.org/fhir/administrative-gender`),
 * HL7 terminology (`http://terminology.hl7.org/CodeSystem/v3-Confidentiality`), IETF BCP codes
 * (`urn:ietf:bcp:13` media types, `urn:ietf:bcp:47` languages).
 */
const BOUND_SYSTEMS = ['http://hl7.org/fhir/', 'http://terminology.hl7.org/', 'urn:ietf:bcp:'];

interface TokenPair {
  readonly system?: string;
  readonly code?: string;
  /** A primitive code: its system is the binding's, not in the data. */
  readonly implicit?: boolean;
}

function tokenPairs(target: unknown): TokenPair[] {
  if (typeof target === 'string') return [{ code: target, implicit: true }];
  if (typeof target === 'boolean') return [{ code: String(target), implicit: true }];
  if (Array.isArray(target)) return target.flatMap(tokenPairs);
  if (!isObject(target)) return [];
  if (Array.isArray(target.coding)) return target.coding.flatMap(tokenPairs);
  const system = typeof target.system === 'string' ? target.system : undefined;
  if (typeof target.code === 'string') return [{ system, code: target.code }];
  // Identifier: system + value; ContactPoint too (its system is a kind: `phone|555-1234`).
  if (typeof target.value === 'string') return [{ system, code: target.value }];
  return [];
}

/** `:text`: the CodeableConcept's text or a coding's display starts with the value (case- and accent-blind). */
function tokenTextMatches(target: unknown, value: string): boolean {
  if (!isObject(target)) return false;
  const texts: string[] = [];
  // R4: CodeableConcept.text, Coding.display, or Identifier.type.text.
  const concept = isObject(target.type) && typeof target.value === 'string' ? target.type : target;
  if (typeof concept.text === 'string') texts.push(concept.text);
  if (typeof concept.display === 'string') texts.push(concept.display);
  for (const c of Array.isArray(concept.coding) ? concept.coding : []) {
    if (isObject(c) && typeof c.display === 'string') texts.push(c.display);
  }
  const want = normalize(unescapeValue(value));
  return texts.some((t) => normalize(t).startsWith(want));
}

// ---------- reference ----------

function referenceMatches(
  target: unknown,
  value: string,
  targets: readonly string[],
  typed: boolean,
  serverBase: string | undefined,
): boolean {
  const ref = isObject(target) ? target.reference : target;
  if (typeof ref !== 'string') return false;
  const have = relative(ref, serverBase);
  const want = unescapeValue(value);
  if (typed) return have === (want.includes('/') ? relative(want, serverBase) : `${targets[0]}/${want}`);
  if (want.includes('/')) return have === relative(want, serverBase) || ref === want;
  // A bare id: a local reference (relative, or under this server's base) to that id among the
  // parameter's target types; not one to another server.
  if (have.includes('://')) return false;
  const slash = have.lastIndexOf('/');
  if (slash === -1) return false;
  const type = have.slice(have.lastIndexOf('/', slash - 1) + 1, slash);
  return have.slice(slash + 1) === want && (targets.length === 0 || targets.includes(type));
}

/**
 * `Type/id` for a reference on the same server (relative, or absolute under `serverBase`), without
 * a version (`/_history/n`); anything else as written.
 */
function relative(ref: string, serverBase: string | undefined): string {
  let r = ref;
  const history = r.indexOf('/_history/');
  if (history !== -1) r = r.slice(0, history);
  if (serverBase !== undefined) {
    const base = serverBase.endsWith('/') ? serverBase : `${serverBase}/`;
    if (r.startsWith(base)) return r.slice(base.length);
  }
  return r;
}

// ---------- string ----------

function stringsOf(target: unknown): string[] {
  if (typeof target === 'string') return [target];
  if (Array.isArray(target)) return target.flatMap(stringsOf);
  if (!isObject(target)) return [];
  // HumanName and Address: every part a person would search by.
  const parts = [
    'text',
    'family',
    'given',
    'prefix',
    'suffix',
    'line',
    'city',
    'district',
    'state',
    'postalCode',
    'country',
  ];
  return parts.flatMap((k) => stringsOf(target[k]));
}

function stringMatches(have: string, value: string, modifier: string | undefined): boolean {
  const want = unescapeValue(value);
  if (modifier === 'exact') return have === want;
  const h = normalize(have);
  const w = normalize(want);
  return modifier === 'contains' ? h.includes(w) : h.startsWith(w);
}

/** Case- and accent-blind comparison form (R4 string search). */
function normalize(s: string): string {
  return s.normalize('NFD').replace(/\p{M}/gu, '').toLowerCase();
}

// ---------- uri ----------

function uriMatches(have: string, value: string, modifier: string | undefined): boolean {
  const want = unescapeValue(value);
  if (modifier === 'below') return have === want || have.startsWith(want.endsWith('/') ? want : `${want}/`);
  if (modifier === 'above') return have === want || want.startsWith(have.endsWith('/') ? have : `${have}/`);
  return have === want;
}

// ---------- date ----------

const DATE_RE =
  /^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$/;

/** A date value's precision as a [start, end) range in epoch ms; undefined when malformed. */
function dateRange(text: string): [number, number] | undefined {
  const m = DATE_RE.exec(text);
  if (m === null) return undefined;
  const [, y, mo, d, h, mi, s, frac, tz] = m;
  const year = Number(y);
  const month = mo === undefined ? 1 : Number(mo);
  const day = d === undefined ? 1 : Number(d);
  // A calendar date: 2024-02-30 is no date (Date.UTC would roll it over to March). Year 0001 on.
  if (year < 1 || month < 1 || month > 12 || day < 1 || day > daysIn(year, month)) return undefined;
  if (
    tz !== undefined &&
    tz !== 'Z' &&
    (Number(tz.slice(1, 3)) * 60 + Number(tz.slice(4, 6)) > 14 * 60 || Number(tz.slice(4, 6)) > 59)
  ) {
    return undefined;
  }
  const offsetMs =
    tz === undefined || tz === 'Z'
      ? 0
      : (tz.startsWith('-') ? -1 : 1) * (Number(tz.slice(1, 3)) * 60 + Number(tz.slice(4, 6))) * 60_000;
  const at = (yy: number, mm: number, dd: number, hh = 0, mn = 0, ss = 0, ms = 0) => {
    // Date.UTC reads years 0–99 as 1900–1999: set the full year apart.
    const t = new Date(Date.UTC(2000, mm - 1, dd, hh, mn, ss, ms));
    t.setUTCFullYear(yy);
    return t.getTime() - offsetMs;
  };
  if (mo === undefined) return [at(year, 1, 1), at(year + 1, 1, 1)];
  if (d === undefined) return [at(year, month, 1), at(month === 12 ? year + 1 : year, month === 12 ? 1 : month + 1, 1)];
  if (h === undefined) {
    const start = at(year, month, day);
    return [start, start + 86_400_000];
  }
  const hour = Number(h);
  const minute = Number(mi);
  if (hour > 23 || minute > 59 || (s !== undefined && Number(s) > 59)) return undefined;
  if (s === undefined) {
    const start = at(year, month, day, hour, minute);
    return [start, start + 60_000];
  }
  if (frac === undefined) {
    const start = at(year, month, day, hour, minute, Number(s));
    return [start, start + 1000];
  }
  const ms = Number(frac.slice(0, 3).padEnd(3, '0'));
  const start = at(year, month, day, hour, minute, Number(s), ms);
  return [start, start + 1];
}

function daysIn(year: number, month: number): number {
  const t = new Date(Date.UTC(2000, month, 0));
  t.setUTCFullYear(year, month, 0);
  return t.getUTCDate();
}

function dateProblem(value: string): string | undefined {
  const prefix = value.slice(0, 2);
  // Two letters then a digit is a prefix (ap2024); anything else lettered is no date at all.
  if (/^[a-z]{2}\d/.test(value) && !DATE_PREFIXES.includes(prefix as DatePrefix)) {
    return `prefix ${prefix} is not supported (supported: ${DATE_PREFIXES.join(', ')})`;
  }
  const body = DATE_PREFIXES.includes(prefix as DatePrefix) ? value.slice(2) : value;
  return dateRange(body) === undefined ? 'not a FHIR date, dateTime or instant' : undefined;
}

/** The target's range: a date/dateTime/instant string, a Period, or a Timing's events. */
function targetRanges(target: unknown): [number, number][] {
  if (typeof target === 'string') {
    const r = dateRange(target);
    return r === undefined ? [] : [r];
  }
  if (!isObject(target)) return [];
  if (Array.isArray(target.event)) return target.event.flatMap(targetRanges);
  if ('start' in target || 'end' in target) {
    const start = typeof target.start === 'string' ? dateRange(target.start)?.[0] : undefined;
    const end = typeof target.end === 'string' ? dateRange(target.end)?.[1] : undefined;
    // A bound that is there but is no date leaves the period unknown, not open on that side.
    if ((target.start !== undefined && start === undefined) || (target.end !== undefined && end === undefined))
      return [];
    if (start === undefined && end === undefined) return [];
    return [[start ?? Number.NEGATIVE_INFINITY, end ?? Number.POSITIVE_INFINITY]];
  }
  return [];
}

/** R4 search.html#prefix, with the search value and the target each as a range. */
function dateMatches(target: unknown, value: string): boolean {
  const prefixed = /^[a-z]{2}/.test(value);
  const prefix = (prefixed ? value.slice(0, 2) : 'eq') as DatePrefix;
  const search = dateRange(prefixed ? value.slice(2) : value);
  if (search === undefined) return false;
  const [sl, sh] = search;
  return targetRanges(target).some(([tl, th]) => {
    const within = sl <= tl && th <= sh;
    switch (prefix) {
      case 'eq':
        return within;
      case 'ne':
        return !within;
      case 'gt':
        return th > sh;
      case 'lt':
        return tl < sl;
      case 'ge':
        return th > sh || within;
      case 'le':
        return tl < sl || within;
      case 'sa':
        return tl >= sh;
      default:
        return th <= sl; // eb
    }
  });
}
