import { describe, expect, it } from 'vitest';
import type { BrokerError } from './errors.js';
import { checkAcceptable, mediaType, mediaTypeParameter, negotiateJson, otherFhirVersion } from './media-type.js';

describe('mediaType and its parameters', () => {
  it('reads the type lower-cased, and a parameter by any case, unquoted', () => {
    const value = 'Application/FHIR+JSON ; FhirVersion="4.0" ; charset=UTF-8';
    expect(mediaType(value)).toBe('application/fhir+json');
    expect([mediaTypeParameter(value, 'fhirversion'), mediaTypeParameter(value, 'charset')]).toEqual(['4.0', 'UTF-8']);
    expect(mediaTypeParameter('application/json; charset', 'charset')).toBeUndefined();
  });

  it('tells another FHIR version from R4 (4.0, 4.0.x) or none', () => {
    expect(['fhirVersion=5.0', 'fhirVersion=4.3', 'fhirVersion=4'].map((p) => otherFhirVersion(`a/b; ${p}`))).toEqual([
      true,
      true,
      true,
    ]);
    expect(
      ['fhirVersion=4.0', 'fhirVersion="4.0.1"', 'charset=utf-8'].map((p) => otherFhirVersion(`a/b; ${p}`)),
    ).toEqual([false, false, false]);
  });
});

describe('negotiateJson', () => {
  it.each<[string | undefined, string]>([
    [undefined, 'application/fhir+json'],
    ['', 'application/fhir+json'],
    ['application/fhir+json', 'application/fhir+json'],
    ['application/json', 'application/json'],
    ['application/json; charset=utf-8', 'application/json'],
    ['*/*', 'application/fhir+json'],
    ['application/*', 'application/fhir+json'],
    ['application/json, application/fhir+json', 'application/fhir+json'],
    ['application/json, application/fhir+json;q=0.5', 'application/json'],
    ['application/json;q=0.5, application/fhir+json', 'application/fhir+json'],
    ['application/fhir+json;q=0, */*', 'application/json'],
    ['application/json;q=0, */*', 'application/fhir+json'],
    ['application/*;q=0, application/fhir+json', 'application/fhir+json'],
    ['application/fhir+json;q=0, text/html', 'application/json'],
    ['text/html', 'application/fhir+json'],
    ['text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8', 'application/fhir+json'],
    ['application/fhir+xml, application/fhir+json;q=0.9', 'application/fhir+json'],
    ['application/fhir+json; fhirVersion=5.0, */*;q=0.1', 'application/fhir+json'],
    ['application/fhir+json; fhirVersion=5.0, application/fhir+json; fhirVersion=4.0', 'application/fhir+json'],
    ['application/json+fhir', 'application/fhir+json'],
    // A malformed weight is none (1): not read as 0.
    ['application/json;q=', 'application/json'],
    ['application/fhir+json;q=abc', 'application/fhir+json'],
    ['application/fhir+json;q=2, application/json;q=0.5', 'application/fhir+json'],
  ])('answers Accept %s in %s', (accept, type) => {
    expect(negotiateJson(undefined, accept)).toBe(type);
  });

  it.each([
    'application/fhir+xml',
    'application/xml, text/xml',
    'application/fhir+json; fhirVersion=5.0',
    'application/fhir+json;q=0, application/fhir+xml',
    'application/fhir+json;q=0',
    'application/fhir+json;q=0.000, application/json;q=0',
    '*/*;q=0',
    'application/fhir+json;q=0, application/json;q=0, text/html',
  ])('accepts nothing it serves from Accept %s', (accept) => {
    expect(negotiateJson(undefined, accept)).toBeUndefined();
  });

  it('takes _format over Accept: application/json is the generic type, json and FHIR JSON names are FHIR JSON', () => {
    expect(negotiateJson('application/json', 'application/fhir+json')).toBe('application/json');
    for (const format of ['json', 'application/fhir+json', 'application/fhir json', 'application/json+fhir']) {
      expect([format, negotiateJson(format, 'application/json')]).toEqual([format, 'application/fhir+json']);
    }
    expect(negotiateJson('xml', 'application/fhir+json')).toBeUndefined();
    // An empty `_format=` is ignored, as any empty search parameter: Accept decides.
    expect(negotiateJson('', 'application/json')).toBe('application/json');
    expect(negotiateJson('', undefined)).toBe('application/fhir+json');
    expect(negotiateJson('application/fhir+json;fhirVersion=3.0', undefined)).toBeUndefined();
  });
});

describe('checkAcceptable', () => {
  it('refuses with 406 NOT_ACCEPTABLE saying what the broker answers', () => {
    const refusal = (format: string | undefined, accept: string | undefined) => {
      try {
        checkAcceptable(format, accept);
      } catch (err) {
        return [(err as BrokerError).status, (err as BrokerError).code, (err as BrokerError).message];
      }
      return 'accepted';
    };
    expect(refusal(undefined, 'application/fhir+json;q=0, application/fhir+xml')).toEqual([
      406,
      'NOT_ACCEPTABLE',
      'Accept application/fhir+json;q=0, application/fhir+xml accepts only XML, another FHIR version, or nothing (q=0); the broker answers application/fhir+json or application/json of FHIR R4 (fhirVersion=4.0)',
    ]);
    expect(refusal('xml', undefined)).toEqual([406, 'NOT_ACCEPTABLE', '_format xml is not served; use json (FHIR R4)']);
    expect(refusal(undefined, 'application/json')).toBe('accepted');
  });
});
