import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { ERROR_CODES } from '../src/core/errors.js';
import { ROUTE_TABLE } from '../src/http/app.js';

/** The documents users rely on agree with the code: openapi.yaml routes and the error-code list. */

interface OpenApi {
  paths: Record<string, Record<string, unknown>>;
  components: { schemas: { ErrorCode: { enum: string[] } } };
}

const doc = parse(readFileSync('openapi.yaml', 'utf8')) as OpenApi;
const METHODS = new Set(['get', 'put', 'post', 'delete', 'patch', 'head', 'options']);

describe('openapi.yaml', () => {
  it('is OpenAPI 3.1', () => {
    expect((doc as unknown as { openapi: string }).openapi).toMatch(/^3\.1\./);
  });

  it('documents exactly the routes the app serves, with the same methods', () => {
    const app = ROUTE_TABLE.flatMap(([path, methods]) =>
      methods.map((m) => `${m} ${path.replace(/:([A-Za-z]+)/g, '{$1}')}`),
    ).sort();
    const documented = Object.entries(doc.paths)
      .flatMap(([path, ops]) =>
        Object.keys(ops)
          .filter((k) => METHODS.has(k))
          .map((m) => `${m.toUpperCase()} ${path}`),
      )
      .sort();
    expect(documented).toEqual(app);
  });

  it('lists every error code the broker can answer', () => {
    expect([...doc.components.schemas.ErrorCode.enum].sort()).toEqual(Object.keys(ERROR_CODES).sort());
  });
});

describe('docs/errors.md', () => {
  const text = readFileSync('docs/errors.md', 'utf8');
  it.each(Object.entries(ERROR_CODES))('documents %s with its HTTP status', (code, { status }) => {
    expect(text).toMatch(new RegExp(`\\| \`${code}\` \\| ${status} \\|`));
  });
});
