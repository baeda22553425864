import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { type Config, ConfigError, fsReason, loadConfig } from '../config.js';
import { CREDENTIALS_FILE, readKept } from '../credentials.js';
import { type ReplayBatch, readReplayInput } from './replay-input.js';

/**
 * `npm run replay -- [--url BASE] FILE...` (`-` reads stdin): sends the EventBridge events in
 * FILEs to a broker's `POST /events` again, as EventBridge would. For dead letters (the files of
 * `aws sqs receive-message`, Lambda's failure records), events saved from a log, the fixtures, or a
 * CloudTrail trail's log files (gzipped as S3 keeps them) for the hours EventBridge missed.
 * The broker deduplicates on the event `id`, so sending what it already has notifies nobody twice.
 *
 * The broker's URL: `--url`, else the one `npm start` would serve (`BROKER_PUBLIC_URL`, or
 * `http://HOST:PORT`). The ingest token: `BROKER_INGEST_TOKEN`, else the data dir's
 * `credentials.json` (`BROKER_DATA_DIR`, `./data`), as `npm start` keeps it. The token is never
 * printed. Exit status 0 when every event was sent and answered 202, else 1.
 */

const RETRIES_MS = [1_000, 2_000, 4_000];
const REQUEST_TIMEOUT_MS = 30_000;

interface Counts {
  accepted: number;
  ignored: number;
  duplicates: number;
}

/** Thrown to stop the whole replay: what follows would fail the same way. */
class Stop extends Error {}

/** What to tell the operator before anything is sent: arguments, or no token to send with. */
class UsageError extends Error {}

async function main(argv: readonly string[]): Promise<number> {
  const { url, files } = parseArgs(argv);
  const config = loadConfig();
  const base = (url ?? config.publicUrl).replace(/\/+$/, '');
  const token = ingestToken(config);
  let total = NONE;
  let failed = 0;
  for (const file of files) {
    let text: string;
    try {
      text = readText(file);
    } catch (err) {
      failed++;
      console.error(`${file}: not read: ${err instanceof GzipError ? err.message : fsReason(err)}`);
      continue;
    }
    const input = readReplayInput(file === '-' ? 'stdin' : file, text);
    for (const s of input.skipped) {
      failed++;
      console.error(`${s.source}: not sent: ${s.reason}`);
    }
    // Not failures: what a trail holds besides HealthLake writes, which the broker would ignore.
    for (const l of input.leftOut) console.error(`${l.source}: left out ${l.count} ${l.reason}`);
    for (const batch of input.batches) {
      let outcome: Outcome;
      try {
        outcome = await send(base, token, batch);
      } catch (err) {
        if (!(err instanceof Stop)) throw err;
        console.error(err.message);
        console.log(summary(total));
        return 1;
      }
      total = add(total, outcome.counts);
      failed += outcome.failures.length;
      for (const f of outcome.failures) console.error(f);
    }
  }
  console.log(summary(total));
  return failed === 0 ? 0 : 1;
}

class GzipError extends Error {}

/** A file's text, gunzipped when it is gzip (a CloudTrail log file as S3 keeps it, `.json.gz`). */
function readText(file: string): string {
  const bytes = readFileSync(file === '-' ? 0 : file);
  if (bytes[0] !== 0x1f || bytes[1] !== 0x8b) return bytes.toString('utf8');
  try {
    return gunzipSync(bytes).toString('utf8');
  } catch (err) {
    throw new GzipError(`a gzip file that does not unzip (${(err as Error).message})`);
  }
}

function summary(c: Counts): string {
  return `accepted ${c.accepted}, duplicates ${c.duplicates}, ignored ${c.ignored}`;
}

function parseArgs(argv: readonly string[]): { url: string | undefined; files: string[] } {
  let url: string | undefined;
  const files: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--url') {
      url = argv[++i];
      if (url === undefined || !/^https?:\/\//.test(url)) throw new UsageError('--url needs an http(s) URL');
    } else if (arg.startsWith('--')) {
      throw new UsageError(`unknown option ${arg}; usage: npm run replay -- [--url BASE] FILE...`);
    } else {
      files.push(arg);
    }
  }
  if (files.length === 0) throw new UsageError('no file given; usage: npm run replay -- [--url BASE] FILE...');
  return { url, files };
}

/**
 * The environment's token (loadConfig has checked it), else the one `npm start` keeps, read and
 * checked as the broker reads it (`readKept`: its errors never quote the file).
 */
function ingestToken(config: Config): string {
  if (config.ingestToken !== undefined) return config.ingestToken;
  const file = join(config.dataDir, CREDENTIALS_FILE);
  if (!existsSync(file)) {
    throw new UsageError(`no ingest token: set BROKER_INGEST_TOKEN, or run where the broker keeps ${file}`);
  }
  return readKept(file).ingestToken;
}

/** What one batch came to: the broker's counts, and each part of it that was not accepted, and why. */
interface Outcome {
  readonly counts: Counts;
  readonly failures: readonly string[];
}

const NONE: Counts = { accepted: 0, ignored: 0, duplicates: 0 };

/**
 * One batch as one request. Refused as too large (413) or as bad (400), a batch of several events
 * is sent again in halves, down to the event the broker refuses, so that one bad event holds up no
 * other. The broker unavailable: see `post`.
 */
async function send(base: string, token: string, batch: ReplayBatch): Promise<Outcome> {
  const res = await post(base, token, batch);
  if (res.status === 202) {
    try {
      return { counts: (await res.json()) as Counts, failures: [] };
    } catch {
      return { counts: NONE, failures: [`${batch.source}: answered 202, but its counts could not be read`] };
    }
  }
  const detail = await diagnostics(res);
  if (res.status === 401) {
    throw new Stop(
      `the broker at ${base} refused the ingest token (401): nothing more sent (a broker started with BROKER_INGEST_TOKEN uses that, not the one its credentials.json keeps)`,
    );
  }
  if (res.status === 404 || res.status === 405) {
    throw new Stop(`${base}/events answered ${res.status}: is --url the broker's base URL? nothing more sent`);
  }
  if ((res.status === 413 || res.status === 400) && batch.events.length > 1) {
    const half = Math.ceil(batch.events.length / 2);
    const first = await send(base, token, part(batch, 0, half));
    const second = await send(base, token, part(batch, half, batch.events.length));
    return { counts: add(first.counts, second.counts), failures: [...first.failures, ...second.failures] };
  }
  return { counts: NONE, failures: [`${batch.source}: refused (${res.status}): ${detail}`] };
}

function add(a: Counts, b: Counts): Counts {
  return { accepted: a.accepted + b.accepted, ignored: a.ignored + b.ignored, duplicates: a.duplicates + b.duplicates };
}

/** Events `from` to `to` (exclusive) of `batch`, named by their place in the file when it has one. */
function part(batch: ReplayBatch, from: number, to: number): ReplayBatch {
  const events = batch.events.slice(from, to);
  if (batch.file === undefined || batch.first === undefined) return { source: batch.source, events };
  const first = batch.first + from;
  const last = batch.first + to - 1;
  const source = first === last ? `${batch.file}#${first}` : `${batch.file}#${first}-${last}`;
  return { source, events, file: batch.file, first };
}

/** Statuses of a broker that is starting, stopping or overloaded: the same request may pass later. */
const RETRYABLE = new Set([429, 502, 503, 504]);

/**
 * The request, tried again after 1, 2 and 4 s while the broker is unavailable (no connection, no
 * answer within 30 s, or a 429/502/503/504): then the replay stops. Sending twice is safe, as the
 * broker deduplicates on the event `id`.
 */
async function post(base: string, token: string, batch: ReplayBatch): Promise<Response> {
  const body = JSON.stringify(batch.events.length === 1 ? batch.events[0] : batch.events);
  for (let attempt = 0; ; attempt++) {
    let error: string;
    try {
      const res = await fetch(`${base}/events`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body,
        signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      });
      if (!RETRYABLE.has(res.status)) return res;
      error = `HTTP ${res.status}`;
      await res.body?.cancel();
    } catch (err) {
      const e = err as Error;
      if (e.name === 'TimeoutError') {
        error = `no answer within ${REQUEST_TIMEOUT_MS / 1000} s`;
      } else if (e.cause instanceof Error) {
        // fetch's network failures: the connection's error is the cause.
        error = e.cause.message;
      } else {
        // Not the network (its message may quote the request, header values included).
        throw new Stop(`${batch.source}: the request could not be made (${e.name}): stopped`);
      }
    }
    const wait = RETRIES_MS[attempt];
    if (wait === undefined) throw new Stop(`${batch.source}: the broker at ${base} is unavailable (${error}): stopped`);
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

/** The OperationOutcome's diagnostics (or its text), for the report. */
async function diagnostics(res: Response): Promise<string> {
  const text = await res.text();
  try {
    const issues = (JSON.parse(text) as { issue?: { diagnostics?: string; details?: { text?: string } }[] }).issue;
    return issues?.map((i) => i.diagnostics ?? i.details?.text).join('; ') || text;
  } catch {
    return text.slice(0, 200);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    console.error(err instanceof ConfigError || err instanceof UsageError ? err.message : err);
    process.exitCode = 1;
  },
);
