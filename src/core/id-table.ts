import { randomBytes } from 'node:crypto';

/**
 * Resource id → posting list (subscription id + 4 flag bits), as an open-addressing hash table whose
 * cells hold the key and the first postings inline.
 *
 * Why this layout: at 100k subscriptions the index no longer fits the CPU caches, so a look-up costs
 * what its chain of dependent memory reads costs. A `Map<string, postings>` walks bucket → entry →
 * key string (to compare) → posting array → its elements: four or five misses in a row. Here a cell is
 * 8 consecutive slots of one array `[fingerprint, id, flags, sub0, sub1, sub2, sub3, more]`, found from
 * a fingerprint computed in JS: one read brings the fingerprint to compare (a small integer, no pointer
 * to follow) and the postings. Only the exact key check follows a pointer, to the id string: two
 * dependent reads per hit (at 100k subscriptions on the bench machine, ~60 ns for the cell and ~25 ns
 * for the key with 2–4 character ids, ~90 ns with 36-character UUIDs).
 *
 * Linear probing keeps a collision chain in neighbouring cells (the next cache line); deletions shift
 * the chain back instead of leaving tombstones, so a look-up never walks cells nobody uses.
 */

/** Slots per cell, and the offset of each field in a cell. */
const STRIDE = 8;
const FP = 0;
const KEY = 1;
const FLAGS = 2;
const SUBS = 3;
const INLINE = 4;
const MORE = 7;

/** Bits of flags per posting: inline posting k has `(cell[FLAGS] >>> (4 * k)) & 0xf`, 0 if the slot is free. */
const FLAG_BITS = 4;
const FLAG_MASK = 0xf;

/** Flag a caller may set on a posting whose subscription has an end: `collect` then checks it. */
export const HAS_END = 8;

/**
 * Grow once more than this share of the cells is in use (linear probing degrades fast above ~0.7);
 * shrink once less than MIN_LOAD is, so a table emptied by removals gives its memory back.
 */
const MAX_LOAD = 0.5;
const MIN_LOAD = 0.125;
const MIN_CAPACITY = 8;

/** 0 marks a free cell in FP, an unused inline posting, and an absent `more` list. */
const FREE = 0;

/** `[subId, flags, subId, flags, …]`: postings beyond the inline ones. */
type More = (string | number)[];
type Slot = string | number | More;

/**
 * Per-process seed: whole-id fingerprints cannot be precomputed by someone registering crafted ids to
 * lengthen one probe chain (the per-client subscription quota bounds how many they could file anyway).
 */
const SEED = randomBytes(4).readUInt32LE(0);

/** How many characters of an id the fingerprint reads, from its end, until a table needs them all. */
const SAMPLED_CHARS = 8;

/** An insert that passes this many ids of its own fingerprint switches its table to whole ids. */
const MAX_SAME_FINGERPRINT = 8;

/**
 * A non-zero 32-bit hash of the length and the last 8 characters of `id` (all of them if `whole`).
 *
 * Bounded work on purpose: hashing a 36-character HealthLake UUID in full costs ~50–120 ns in JS,
 * as much as the rest of a match; 8 characters cost ~15 ns, 2–4 characters ~8 ns. The tail is where
 * ids differ: the last 8 characters of a random UUID carry 32 random bits, and sequential ids
 * (`pat-000123`) vary at their end. Ids of one length that differ only before their last 8 characters
 * collide, which costs probing, never correctness (every hit compares the whole id); a table that would
 * hold more than MAX_SAME_FINGERPRINT of them switches to whole ids, so they cannot pile up.
 */
export function idFingerprint(id: string, whole = false): number {
  const n = id.length;
  let h = Math.imul(n ^ SEED, 0x9e3779b1);
  for (let i = whole || n <= SAMPLED_CHARS ? 0 : n - SAMPLED_CHARS; i < n; i++) {
    h = Math.imul(h ^ id.charCodeAt(i), 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  return h === FREE ? 1 : h;
}

export class IdTable {
  #cells = freeCells(MIN_CAPACITY);
  #mask = MIN_CAPACITY - 1;
  #ids = 0;
  #wholeIds = false;

  /** Number of ids with at least one posting. */
  get size(): number {
    return this.#ids;
  }

  /** Whether the table fingerprints whole ids (it saw too many ids sharing a tail); for tests. */
  get fingerprintsWholeIds(): boolean {
    return this.#wholeIds;
  }

  /** Files `subId` under `id` with `flags` (non-zero, 4 bits); the caller never files a pair twice. */
  add(id: string, subId: string, flags: number): void {
    const fp = idFingerprint(id, this.#wholeIds);
    let base = this.#find(id, fp);
    if (base === -1) {
      if ((this.#ids + 1) / (this.#mask + 1) > MAX_LOAD) this.#resize(2 * (this.#mask + 1));
      base = this.#insert(id, fp);
    }
    const cells = this.#cells;
    const inline = cells[base + FLAGS] as number;
    for (let k = 0; k < INLINE; k++) {
      if (((inline >>> (FLAG_BITS * k)) & FLAG_MASK) === 0) {
        cells[base + SUBS + k] = subId;
        cells[base + FLAGS] = inline | (flags << (FLAG_BITS * k));
        return;
      }
    }
    const more = cells[base + MORE];
    if (more === FREE) cells[base + MORE] = [subId, flags];
    else (more as More).push(subId, flags);
  }

  /** Drops the posting of `subId` under `id`, and `id` with its last posting; absent ones are ignored. */
  remove(id: string, subId: string): void {
    const base = this.#find(id, idFingerprint(id, this.#wholeIds));
    if (base === -1) return;
    const cells = this.#cells;
    const more = cells[base + MORE] as More | typeof FREE;
    const k = more === FREE ? -1 : more.indexOf(subId);
    if (k !== -1) {
      const list = more as More;
      list[k] = list[list.length - 2] as string;
      list[k + 1] = list[list.length - 1] as number;
      list.length -= 2;
      if (list.length === 0) cells[base + MORE] = FREE;
      return;
    }
    for (let slot = 0; slot < INLINE; slot++) {
      if (cells[base + SUBS + slot] !== subId) continue;
      const shift = FLAG_BITS * slot;
      let flags = (cells[base + FLAGS] as number) & ~(FLAG_MASK << shift);
      if (more === FREE) {
        cells[base + SUBS + slot] = FREE;
      } else {
        // Refill the slot from `more`, which then holds postings only while all four slots are taken.
        flags |= (more.pop() as number) << shift;
        cells[base + SUBS + slot] = more.pop() as string;
        if (more.length === 0) cells[base + MORE] = FREE;
      }
      cells[base + FLAGS] = flags;
      if (flags !== 0) return;
      this.#deleteAt(base);
      const capacity = this.#mask + 1;
      if (capacity > MIN_CAPACITY && this.#ids < capacity * MIN_LOAD) this.#resize(capacity / 2);
      return;
    }
  }

  /**
   * Pushes onto `out` the subscriptions filed under `id` whose flags share a bit with `bit`, skipping
   * those flagged HAS_END whose end in `ends` is at or before `nowMs`.
   */
  collect(id: string, bit: number, nowMs: number, ends: ReadonlyMap<string, number>, out: string[]): void {
    if (this.#ids === 0) return;
    const base = this.#find(id, idFingerprint(id, this.#wholeIds));
    if (base === -1) return;
    const cells = this.#cells;
    const inline = cells[base + FLAGS] as number;
    for (let k = 0; k < INLINE; k++) {
      const flags = (inline >>> (FLAG_BITS * k)) & FLAG_MASK;
      if ((flags & bit) !== 0) push(cells[base + SUBS + k] as string, flags, nowMs, ends, out);
    }
    const more = cells[base + MORE];
    if (more === FREE) return;
    const list = more as More;
    for (let k = 0; k < list.length; k += 2) {
      const flags = list[k + 1] as number;
      if ((flags & bit) !== 0) push(list[k] as string, flags, nowMs, ends, out);
    }
  }

  /** The first slot of the cell holding `id`, or -1. */
  #find(id: string, fp: number): number {
    const cells = this.#cells;
    const mask = this.#mask;
    for (let cell = fp & mask; ; cell = (cell + 1) & mask) {
      const base = cell * STRIDE;
      const f = cells[base + FP];
      if (f === FREE) return -1;
      if (f === fp && cells[base + KEY] === id) return base;
    }
  }

  /**
   * Claims the first free cell of `fp`'s chain for `id` (absent, and a free cell exists) and returns
   * its first slot. If the chain holds too many other ids of the same fingerprint, first switches the
   * table to whole-id fingerprints (rehashing it), then files `id` under its new fingerprint.
   */
  #insert(id: string, fp: number): number {
    const cells = this.#cells;
    const mask = this.#mask;
    let cell = fp & mask;
    let same = 0;
    for (; cells[cell * STRIDE + FP] !== FREE; cell = (cell + 1) & mask) if (cells[cell * STRIDE + FP] === fp) same++;
    if (same >= MAX_SAME_FINGERPRINT && !this.#wholeIds) {
      this.#wholeIds = true;
      this.#resize(mask + 1);
      return this.#insert(id, idFingerprint(id, true));
    }
    const base = cell * STRIDE;
    cells[base + FP] = fp;
    cells[base + KEY] = id;
    this.#ids++;
    return base;
  }

  /** Frees the cell at `base`, moving later cells of the chain back so no look-up stops early. */
  #deleteAt(base: number): void {
    const cells = this.#cells;
    const mask = this.#mask;
    let hole = base / STRIDE;
    for (let cell = (hole + 1) & mask; cells[cell * STRIDE + FP] !== FREE; cell = (cell + 1) & mask) {
      const home = (cells[cell * STRIDE + FP] as number) & mask;
      // The cell may fill the hole if the hole lies on its probe path (between home and itself).
      if (((cell - home) & mask) >= ((cell - hole) & mask)) {
        for (let s = 0; s < STRIDE; s++) cells[hole * STRIDE + s] = cells[cell * STRIDE + s] as Slot;
        hole = cell;
      }
    }
    for (let s = 0; s < STRIDE; s++) cells[hole * STRIDE + s] = FREE;
    this.#ids--;
  }

  #resize(capacity: number): void {
    const old = this.#cells;
    this.#cells = freeCells(capacity);
    this.#mask = capacity - 1;
    this.#ids = 0;
    for (let base = 0; base < old.length; base += STRIDE) {
      if (old[base + FP] === FREE) continue;
      const id = old[base + KEY] as string;
      const to = this.#insert(id, this.#wholeIds ? idFingerprint(id, true) : (old[base + FP] as number));
      for (let s = FLAGS; s < STRIDE; s++) this.#cells[to + s] = old[base + s] as Slot;
    }
  }
}

/** Built by pushes, so the array is packed (`new Array(n)` would be holey: a hole check per read). */
function freeCells(capacity: number): Slot[] {
  const cells: Slot[] = [];
  for (let s = 0; s < capacity * STRIDE; s++) cells.push(FREE);
  return cells;
}

function push(subId: string, flags: number, nowMs: number, ends: ReadonlyMap<string, number>, out: string[]): void {
  if ((flags & HAS_END) !== 0 && (ends.get(subId) as number) <= nowMs) return;
  out.push(subId);
}
