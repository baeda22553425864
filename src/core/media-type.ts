import { BrokerError } from './errors.js';

/**
 * Media types, and the content negotiation of the one format the broker speaks: JSON of FHIR R4,
 * as `application/fhir+json` or, to a client that asks for the generic type, `application/json`.
 */

export const FHIR_JSON_TYPE = 'application/fhir+json';
export const GENERIC_JSON_TYPE = 'application/json';
export type JsonRepresentation = typeof FHIR_JSON_TYPE | typeof GENERIC_JSON_TYPE;

/** A media type without its parameters, lower-cased: `Application/FHIR+JSON; charset=utf-8` → `application/fhir+json`. */
export function mediaType(value: string | undefined): string {
  return (value ?? '').split(';')[0]?.trim().toLowerCase() ?? '';
}

/** A parameter of a media type or range (name in any case, value unquoted), or undefined without it. */
export function mediaTypeParameter(value: string, name: string): string | undefined {
  const wanted = name.toLowerCase();
  // Most values have no such parameter: said without splitting (POST /events checks every request).
  const lower = value.toLowerCase();
  if (!lower.includes(wanted)) return undefined;
  for (let start = lower.indexOf(';'); start !== -1; ) {
    const end = lower.indexOf(';', start + 1);
    const param = value.slice(start + 1, end === -1 ? undefined : end);
    const eq = param.indexOf('=');
    if (eq !== -1 && param.slice(0, eq).trim().toLowerCase() === wanted) {
      const v = param.slice(eq + 1).trim();
      return v.length >= 2 && v.startsWith('"') && v.endsWith('"') ? v.slice(1, -1) : v;
    }
    start = end;
  }
  return undefined;
}

/** The charset a media type names when it is not UTF-8 (`utf-8` or `utf8`, any case); undefined when it is, or names none. */
export function otherCharset(value: string): string | undefined {
  const charset = mediaTypeParameter(value, 'charset');
  return charset !== undefined && !/^utf-?8$/i.test(charset) ? charset : undefined;
}

/**
 * Whether a media type names another FHIR version than R4 (`fhirVersion=5.0`): the broker speaks
 * R4 (4.0, and 4.0.x as some clients write it) alone. No parameter: any version, R4 included.
 */
export function otherFhirVersion(value: string): boolean {
  const version = mediaTypeParameter(value, 'fhirVersion');
  return version !== undefined && !/^4\.0(\.\d+)?$/.test(version);
}

const XML_FORMATS = new Set(['xml', 'text/xml', 'application/xml', 'application/fhir+xml', 'application/xml+fhir']);
const JSON_FORMATS = new Set(['json', GENERIC_JSON_TYPE, FHIR_JSON_TYPE, 'application/json+fhir']);

interface MediaRange {
  readonly type: string;
  readonly q: number;
  /** Parameters besides `q`: `application/fhir+json; fhirVersion=4.0` is more specific than without. */
  readonly parameters: boolean;
  readonly otherVersion: boolean;
}

/** An RFC 9110 §12.4.2 weight: `0` to `1` with up to three decimals. */
const WEIGHT = /^(0(\.\d{0,3})?|1(\.0{0,3})?)$/;

function mediaRange(text: string): MediaRange {
  const weight = mediaTypeParameter(text, 'q');
  const q = weight !== undefined && WEIGHT.test(weight) ? Number(weight) : 1;
  const parameters = text
    .split(';')
    .slice(1)
    .some((p) => p.split('=')[0]?.trim().toLowerCase() !== 'q');
  return {
    type: mediaType(text),
    // A malformed weight (`q=`, `q=abc`, `q=2`) is read as none (1) rather than refusing the request.
    q,
    parameters,
    otherVersion: otherFhirVersion(text),
  };
}

/**
 * How specifically `range` names `type` (RFC 9110 §12.5.1): `type/subtype` with parameters 3,
 * without 2, `type/*` 1, `*\/*` 0; -1 when it does not. A range of another FHIR version names
 * nothing the broker serves; `application/json+fhir`, the DSTU2 name, is FHIR JSON.
 */
function specificity(range: MediaRange, type: JsonRepresentation): number {
  if (range.otherVersion) return -1;
  if (range.type === type || (type === FHIR_JSON_TYPE && range.type === 'application/json+fhir')) {
    return range.parameters ? 3 : 2;
  }
  if (range.type === 'application/*') return 1;
  return range.type === '*/*' ? 0 : -1;
}

/** The weight Accept gives `type`: that of the most specific ranges naming it; undefined when none does. */
function weightOf(ranges: readonly MediaRange[], type: JsonRepresentation): number | undefined {
  let best: { specificity: number; q: number } | undefined;
  for (const range of ranges) {
    const s = specificity(range, type);
    if (s < 0 || (best !== undefined && best.specificity > s)) continue;
    best = { specificity: s, q: best?.specificity === s ? Math.max(best.q, range.q) : range.q };
  }
  return best?.q;
}

/**
 * The JSON to answer in, from `_format` (which overrides Accept, as FHIR says) or else Accept;
 * undefined when the request accepts neither (a 406). `application/json` when the client asked
 * for that generic type (Accept, at a weight above FHIR JSON's, or `_format=application/json`):
 * R4 http.html says a server SHOULD answer in the type asked. `_format=json` names the JSON format,
 * no media type: FHIR's own. Accept naming only types the broker does not serve (`text/html`) still
 * gets FHIR JSON; only XML, another FHIR version, or weight 0 (RFC 9110 §12.4.2: "not acceptable")
 * on every type named refuses.
 */
export function negotiateJson(format: string | undefined, accept: string | undefined): JsonRepresentation | undefined {
  // An empty `_format=` is ignored, as every empty search parameter is (FHIR search).
  if (format !== undefined && format !== '') {
    // An unencoded `+` in a query string arrives as a space: `application/fhir json`.
    const type = mediaType(format).replaceAll(' ', '+');
    if (!JSON_FORMATS.has(type) || otherFhirVersion(format)) return undefined;
    return type === GENERIC_JSON_TYPE ? GENERIC_JSON_TYPE : FHIR_JSON_TYPE;
  }
  if (accept === undefined || accept.trim() === '') return FHIR_JSON_TYPE;
  const ranges = accept
    .split(',')
    .map(mediaRange)
    .filter((r) => r.type !== '');
  if (ranges.length === 0) return FHIR_JSON_TYPE;
  const fhir = weightOf(ranges, FHIR_JSON_TYPE);
  const generic = weightOf(ranges, GENERIC_JSON_TYPE);
  if ((fhir ?? 0) > 0 || (generic ?? 0) > 0) return (generic ?? 0) > (fhir ?? 0) ? GENERIC_JSON_TYPE : FHIR_JSON_TYPE;
  // Neither is named at a weight above 0: JSON all the same, unless every type asked for is XML or
  // another FHIR version, or both JSON types were refused outright.
  const asksOtherwise = ranges.some((r) => r.q > 0 && !r.otherVersion && !XML_FORMATS.has(r.type));
  if (!asksOtherwise || (fhir === 0 && generic === 0)) return undefined;
  return fhir === 0 ? GENERIC_JSON_TYPE : FHIR_JSON_TYPE;
}

/** 406 unless the request accepts JSON of FHIR R4 (see negotiateJson). */
export function checkAcceptable(format: string | undefined, accept: string | undefined): void {
  if (negotiateJson(format, accept) !== undefined) return;
  if (format !== undefined) {
    throw new BrokerError('NOT_ACCEPTABLE', `_format ${format.slice(0, 64)} is not served; use json (FHIR R4)`);
  }
  throw new BrokerError(
    'NOT_ACCEPTABLE',
    `Accept ${(accept ?? '').slice(0, 64)} accepts only XML, another FHIR version, or nothing (q=0); the broker answers application/fhir+json or application/json of FHIR R4 (fhirVersion=4.0)`,
  );
}
