import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { type Config, ConfigError, loadConfig } from '../config.js';
import { type ReplayBatch, readReplayInput } from './replay-input.js';

/**
 * `npm run replay -- [--url BASE] FILE...` (`-` reads stdin): sends the EventBridge events in
 * FILEs to a broker's `POST /events` again, as EventBridge would. For dead letters (the files of
 * `aws sqs receive-message`, Lambda's failure records), events saved from a log, or the fixtures.
 * The broker deduplicates on the event `id`, so sending what it already has notifies nobody twice.
 *
 * The broker's URL: `--url`, else the one `npm start` would serve (`BROKER_PUBLIC_URL`, or
 * `http://HOST:PORT`). The ingest token: `BROKER_INGEST_TOKEN`, else the data dir's
 * `credentials.json` (`BROKER_DATA_DIR`, `./data`), as `npm start` keeps it. The token is never
 * printed. Exit status 0 when every event was sent and answered 202, else 1.
 */

const RETRIES_MS = [1_000, 2_000, 4_000];

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
  const total: Counts = { accepted: 0, ignored: 0, duplicates: 0 };
  let failed = 0;
  for (const file of files) {
    let text: string;
    try {
      text = readFileSync(file === '-' ? 0 : file, 'utf8');
    } catch (err) {
      failed++;
      console.error(`${file}: not read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
      continue;
    }
    const input = readReplayInput(file === '-' ? 'stdin' : file, text);
    for (const s of input.skipped) {
      failed++;
      console.error(`${s.source}: not sent: ${s.reason}`);
    }
    for (const batch of input.batches) {
      try {
        const counts = await send(base, token, batch);
        total.accepted += counts.accepted;
        total.ignored += counts.ignored;
        total.duplicates += counts.duplicates;
      } catch (err) {
        if (err instanceof Stop) {
          console.error(err.message);
          console.log(summary(total));
          return 1;
        }
        failed++;
        console.error(`${batch.source}: ${(err as Error).message}`);
      }
    }
  }
  console.log(summary(total));
  return failed === 0 ? 0 : 1;
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

function ingestToken(config: Config): string {
  if (config.ingestToken !== undefined) return config.ingestToken;
  const file = join(config.dataDir, 'credentials.json');
  let token: unknown;
  try {
    token = (JSON.parse(readFileSync(file, 'utf8')) as { ingestToken?: unknown }).ingestToken;
  } catch (err) {
    throw new UsageError(
      `no ingest token: set BROKER_INGEST_TOKEN, or run where the broker keeps ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`,
    );
  }
  if (typeof token !== 'string' || token === '') throw new UsageError(`${file} holds no ingestToken`);
  return token;
}

/**
 * One batch as one request. Too large for the broker (413): sent again in halves. The broker
 * unavailable (5xx, no connection): tried again after 1, 2 and 4 s, then the replay stops.
 */
async function send(base: string, token: string, batch: ReplayBatch): Promise<Counts> {
  const res = await post(base, token, batch);
  if (res.status === 202) return (await res.json()) as Counts;
  const detail = await diagnostics(res);
  if (res.status === 401) throw new Stop(`the broker at ${base} refused the ingest token (401): nothing more sent`);
  if (res.status === 413 && batch.events.length > 1) {
    const half = Math.ceil(batch.events.length / 2);
    const first = await send(base, token, { source: batch.source, events: batch.events.slice(0, half) });
    const second = await send(base, token, { source: batch.source, events: batch.events.slice(half) });
    return {
      accepted: first.accepted + second.accepted,
      ignored: first.ignored + second.ignored,
      duplicates: first.duplicates + second.duplicates,
    };
  }
  throw new Error(`refused (${res.status}): ${detail}`);
}

async function post(base: string, token: string, batch: ReplayBatch): Promise<Response> {
  const body = JSON.stringify(batch.events.length === 1 ? batch.events[0] : batch.events);
  for (let attempt = 0; ; attempt++) {
    let res: Response | undefined;
    let error = '';
    try {
      res = await fetch(`${base}/events`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body,
      });
      if (res.status < 500) return res;
      error = `HTTP ${res.status}`;
      await res.body?.cancel();
    } catch (err) {
      error = ((err as Error).cause as Error | undefined)?.message ?? (err as Error).message;
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
