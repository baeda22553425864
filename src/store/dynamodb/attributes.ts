import type { AttributeValue } from '@aws-sdk/client-dynamodb';
import { CorruptItemError } from './errors.js';

/**
 * Plain AttributeValue maps, without a marshalling library: the adapter stores a handful of
 * flat attributes (strings, numbers, JSON blobs as strings), so a few typed helpers are enough.
 */

export type Item = Record<string, AttributeValue>;

export const S = (value: string): AttributeValue => ({ S: value });
export const N = (value: number): AttributeValue => ({ N: String(value) });

export function readString(item: Item, name: string): string {
  const value = item[name]?.S;
  if (value === undefined) throw new CorruptItemError(name, 'a string');
  return value;
}

export function readOptionalString(item: Item, name: string): string | undefined {
  const attr = item[name];
  if (attr === undefined) return undefined;
  if (attr.S === undefined) throw new CorruptItemError(name, 'a string');
  return attr.S;
}

export function readNumber(item: Item, name: string): number {
  const raw = item[name]?.N;
  const value = raw === undefined ? Number.NaN : Number(raw);
  if (!Number.isFinite(value)) throw new CorruptItemError(name, 'a number');
  return value;
}

export function readOptionalNumber(item: Item, name: string): number | undefined {
  return item[name] === undefined ? undefined : readNumber(item, name);
}

/**
 * Builds an update (and its condition) with every attribute name and value bound to a
 * placeholder, so reserved words (`status`, `end`, `owner`) never need special care.
 */
export class Expression {
  readonly names: Record<string, string> = {};
  readonly values: Record<string, AttributeValue> = {};
  readonly #sets: string[] = [];
  readonly #removes: string[] = [];
  readonly #adds: string[] = [];

  /** Attribute names here are identifiers, so `#name` is a safe placeholder. */
  name(attr: string): string {
    const placeholder = `#${attr}`;
    this.names[placeholder] = attr;
    return placeholder;
  }

  value(value: AttributeValue): string {
    const placeholder = `:v${Object.keys(this.values).length}`;
    this.values[placeholder] = value;
    return placeholder;
  }

  set(attr: string, value: AttributeValue): this {
    this.#sets.push(`${this.name(attr)} = ${this.value(value)}`);
    return this;
  }

  /** SET when a value is given, REMOVE otherwise: optional fields are absent, never null. */
  setOrRemove(attr: string, value: AttributeValue | undefined): this {
    if (value === undefined) this.#removes.push(this.name(attr));
    else this.set(attr, value);
    return this;
  }

  /** SET `attr` to another attribute of the same item, or REMOVE it. */
  copyOrRemove(attr: string, from: string, copy: boolean): this {
    if (copy) this.#sets.push(`${this.name(attr)} = ${this.name(from)}`);
    else this.#removes.push(this.name(attr));
    return this;
  }

  add(attr: string, value: AttributeValue): this {
    this.#adds.push(`${this.name(attr)} ${this.value(value)}`);
    return this;
  }

  /** `#attr IN (:a, :b)`; callers guarantee a non-empty list (DynamoDB rejects `IN ()`). */
  in(attr: string, values: readonly string[]): string {
    return `${this.name(attr)} IN (${values.map((v) => this.value(S(v))).join(', ')})`;
  }

  get update(): string {
    return [
      this.#sets.length === 0 ? '' : `SET ${this.#sets.join(', ')}`,
      this.#removes.length === 0 ? '' : `REMOVE ${this.#removes.join(', ')}`,
      this.#adds.length === 0 ? '' : `ADD ${this.#adds.join(', ')}`,
    ]
      .filter((part) => part !== '')
      .join(' ');
  }

  /** Names and values for the request; DynamoDB rejects empty maps. */
  get bindings(): {
    ExpressionAttributeNames?: Record<string, string>;
    ExpressionAttributeValues?: Record<string, AttributeValue>;
  } {
    return {
      ...(Object.keys(this.names).length === 0 ? {} : { ExpressionAttributeNames: this.names }),
      ...(Object.keys(this.values).length === 0 ? {} : { ExpressionAttributeValues: this.values }),
    };
  }
}
