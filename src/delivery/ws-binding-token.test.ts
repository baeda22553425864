import { expect, it } from 'vitest';
import { BindingTokens } from './ws-binding-token.js';

/** Binding tokens: `v1.<claims>.<mac>`, and nothing else verifies. */

const tokens = new BindingTokens('k'.repeat(40));
const NOW = Date.parse('2030-01-01T00:00:00Z');
const claims = { owner: 'alice', subscriptions: ['a', 'b'], expiresAt: NOW + 60_000 };

it('verifies a token it issued, with its claims', () => {
  expect(tokens.verify(tokens.issue(claims), NOW)).toEqual(claims);
});

it('refuses a genuine token with anything appended as another segment', () => {
  const token = tokens.issue(claims);
  for (const extra of [`${token}.x`, `${token}.`, `${token}..`, `${token}.${token}`]) {
    expect(() => tokens.verify(extra, NOW)).toThrow('malformed token');
  }
});

it('refuses an expired, a tampered and a foreign token', () => {
  const token = tokens.issue(claims);
  expect(() => tokens.verify(token, claims.expiresAt)).toThrow('token expired');
  expect(() => tokens.verify(`${token.slice(0, -4)}AAAA`, NOW)).toThrow('invalid token');
  expect(() => new BindingTokens('x'.repeat(40)).verify(token, NOW)).toThrow('invalid token');
});

it('after a rotation signs with the new key, and binds tokens of the old one for the grace period only', () => {
  const rotating = new BindingTokens('k'.repeat(40));
  const before = rotating.issue(claims);
  // The same key again changes nothing.
  rotating.rotate('k'.repeat(40), NOW, 30_000);
  expect(rotating.verify(before, NOW + 40_000)).toEqual(claims);
  rotating.rotate('n'.repeat(40), NOW, 30_000);
  const after = rotating.issue(claims);
  expect(new BindingTokens('n'.repeat(40)).verify(after, NOW)).toEqual(claims);
  expect(() => new BindingTokens('k'.repeat(40)).verify(after, NOW)).toThrow('invalid token');
  expect(rotating.verify(before, NOW + 29_999)).toEqual(claims);
  expect(() => rotating.verify(before, NOW + 30_000)).toThrow('invalid token');
  // A second rotation within the grace (a mistaken secret put right) keeps honouring the first
  // key's tokens until their own grace ends, and the second key's until its own.
  rotating.rotate('m'.repeat(40), NOW + 1_000, 30_000);
  expect(rotating.verify(before, NOW + 2_000)).toEqual(claims);
  expect(() => rotating.verify(before, NOW + 30_000)).toThrow('invalid token');
  expect(rotating.verify(after, NOW + 30_999)).toEqual(claims);
  expect(() => rotating.verify(after, NOW + 31_000)).toThrow('invalid token');
  expect(() => rotating.rotate('short', NOW, 30_000)).toThrow('at least 32 characters');
});

it('honours at most the last 8 rotated-out keys, and forgets those past their grace at the next rotation', () => {
  const rotating = new BindingTokens('a'.repeat(40));
  const first = rotating.issue(claims);
  for (let i = 0; i < 8; i++) rotating.rotate(String(i).repeat(40), NOW, 60_000);
  // Eight rotations: the first key is the eighth rotated out, still honoured.
  expect(rotating.verify(first, NOW)).toEqual(claims);
  rotating.rotate('z'.repeat(40), NOW, 60_000);
  expect(() => rotating.verify(first, NOW)).toThrow('invalid token');
  // Rotating back to a key still in grace signs with it again.
  const withZ = rotating.issue(claims);
  rotating.rotate('7'.repeat(40), NOW + 1, 60_000);
  expect(rotating.verify(withZ, NOW + 2)).toEqual(claims);
  expect(new BindingTokens('7'.repeat(40)).verify(rotating.issue(claims), NOW)).toEqual(claims);
});
