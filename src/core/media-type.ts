/** A media type without its parameters, lower-cased: `Application/FHIR+JSON; charset=utf-8` → `application/fhir+json`. */
export function mediaType(value: string | undefined): string {
  return (value ?? '').split(';')[0]?.trim().toLowerCase() ?? '';
}
