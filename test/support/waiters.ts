/**
 * Waiting for a condition without polling: `wake()` is called whenever something the conditions
 * read may have changed (a request arrived, a frame came in, a log line was written).
 */
export class Waiters {
  readonly #waiters = new Set<() => void>();

  wake(): void {
    for (const w of [...this.#waiters]) w();
  }

  /** Resolves with the first non-undefined value of `probe`, or rejects after `timeoutMs`. */
  until<T>(probe: () => T | undefined, what: string, timeoutMs: number): Promise<T> {
    const now = probe();
    if (now !== undefined) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.delete(check);
        reject(new Error(`timed out waiting for ${what}`));
      }, timeoutMs);
      const check = (): void => {
        const value = probe();
        if (value === undefined) return;
        clearTimeout(timer);
        this.#waiters.delete(check);
        resolve(value);
      };
      this.#waiters.add(check);
    });
  }
}
