import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

/**
 * Binding tokens for `$get-ws-binding-token`: short-lived, bound to one client and the listed
 * subscriptions. Stateless (HMAC-SHA256 over the claims), so any broker instance or Lambda that
 * holds the key can verify them without a shared store.
 */

export interface BindingClaims {
  readonly owner: string;
  readonly subscriptions: readonly string[];
  /** Epoch ms. */
  readonly expiresAt: number;
}

export class BindingTokenError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BindingTokenError';
  }
}

const VERSION = 'v1';
/** Rotated-out keys still honoured (within their grace): bounds a rotation loop's cost per verify. */
const MAX_PREVIOUS_KEYS = 8;

export class BindingTokens {
  #key: Buffer;
  /**
   * The keys before the last rotations, each with until when (epoch ms) the tokens it signed still
   * bind: every one rotated out within a token's lifetime, so two rotations in a row (a mistaken
   * secret put right) refuse no token before it expires. At most MAX_PREVIOUS_KEYS, newest first.
   */
  #previous: { readonly key: Buffer; readonly until: number }[] = [];

  constructor(key: string) {
    this.#key = keyOf(key);
  }

  /**
   * Signs with `key` from now on (the operator rotated the secret; the same key again changes
   * nothing). Tokens signed with the key before still bind until `nowMs + graceMs` (their lifetime
   * at most), so a client that fetched one just before the rotation is not refused.
   */
  rotate(key: string, nowMs: number, graceMs: number): void {
    const next = keyOf(key);
    if (next.equals(this.#key)) return;
    const kept = this.#previous.filter((p) => nowMs < p.until && !p.key.equals(next));
    this.#previous = [{ key: this.#key, until: nowMs + graceMs }, ...kept].slice(0, MAX_PREVIOUS_KEYS);
    this.#key = next;
  }

  issue(claims: BindingClaims): string {
    const body = Buffer.from(
      JSON.stringify({
        o: claims.owner,
        s: claims.subscriptions,
        e: claims.expiresAt,
        n: randomBytes(8).toString('hex'),
      }),
    ).toString('base64url');
    return `${VERSION}.${body}.${this.#mac(body)}`;
  }

  /**
   * The claims of a genuine, unexpired token; throws BindingTokenError saying what is wrong.
   * `anyAge`: an expired one too, signed with any key kept (to unbind what it bound: a socket may
   * always let go of its own bindings).
   */
  verify(token: string, nowMs: number, anyAge = false): BindingClaims {
    const parts = token.split('.');
    // Exactly `v1.<body>.<mac>`: a genuine token with anything appended (`<token>.x`) is not that token.
    const [version, body, mac] = parts;
    if (parts.length !== 3 || version !== VERSION || body === undefined || mac === undefined)
      throw new BindingTokenError('malformed token');
    const given = Buffer.from(mac);
    const signedWith = (key: Buffer): boolean => {
      const expected = Buffer.from(this.#mac(body, key));
      return expected.length === given.length && timingSafeEqual(expected, given);
    };
    if (!signedWith(this.#key) && !this.#previous.some((p) => (anyAge || nowMs < p.until) && signedWith(p.key)))
      throw new BindingTokenError('invalid token');
    let parsed: { o?: unknown; s?: unknown; e?: unknown };
    try {
      parsed = JSON.parse(Buffer.from(body, 'base64url').toString('utf8')) as typeof parsed;
    } catch {
      throw new BindingTokenError('malformed token');
    }
    const { o, s, e } = parsed;
    if (typeof o !== 'string' || !Array.isArray(s) || !s.every((x) => typeof x === 'string') || typeof e !== 'number') {
      throw new BindingTokenError('malformed token');
    }
    if (e <= nowMs && !anyAge) throw new BindingTokenError('token expired');
    return { owner: o, subscriptions: s as string[], expiresAt: e };
  }

  #mac(body: string, key = this.#key): string {
    return createHmac('sha256', key).update(`${VERSION}.${body}`).digest('base64url');
  }
}

function keyOf(key: string): Buffer {
  if (key.length < 32) throw new TypeError('the binding-token key must be at least 32 characters');
  return Buffer.from(key, 'utf8');
}
