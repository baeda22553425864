import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type BrokerProcess, INGEST_TOKEN, startBroker } from './support/broker-process.js';
import { eventLike } from './support/fhir-client.js';
import { tempDir } from './support/temp-dirs.js';

/**
 * `npm run replay` (src/replay/main.ts) as an operator runs it, against a real broker process:
 * dead letters in the forms AWS keeps them, sent once, then again (duplicates), and what it
 * refuses or cannot read reported without stopping the rest.
 */

interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

function replay(args: string[], env: Record<string, string> = {}, stdin?: string): Promise<Run> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/replay/main.ts', ...args], {
    cwd: process.cwd(),
    env: { PATH: process.env.PATH ?? '', ...env },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c));
  child.stderr.on('data', (c: Buffer) => (stderr += c));
  child.stdin.end(stdin ?? '');
  return new Promise((resolve) => child.once('close', (code) => resolve({ code, stdout, stderr })));
}

describe('npm run replay', () => {
  let broker: BrokerProcess;
  let dir: string;
  const withToken = { BROKER_INGEST_TOKEN: INGEST_TOKEN };

  beforeAll(async () => {
    broker = await startBroker();
    dir = tempDir('fsb-replay-');
  });
  afterAll(async () => {
    await broker?.kill('SIGTERM');
  });

  const file = (name: string, content: unknown): string => {
    const path = join(dir, name);
    writeFileSync(path, typeof content === 'string' ? content : JSON.stringify(content));
    return path;
  };
  /** A credentials file as `npm start` keeps it, with this ingest token. */
  const kept = (ingestToken: string): string =>
    JSON.stringify({ apiClient: { clientId: 'local', token: 'fsb_replay-test-api-key-0123' }, ingestToken });
  const failureRecord = (payload: unknown) => ({
    version: '1.0',
    timestamp: '2026-11-29T10:00:00.000Z',
    requestContext: {
      requestId: 'r',
      functionArn: 'arn:aws:lambda:us-east-1:1:function:events',
      condition: 'RetriesExhausted',
    },
    requestPayload: payload,
    responsePayload: { errorType: 'Error', errorMessage: 'boom' },
  });

  it('sends the dead letters of an SQS dump once: a second run finds them all duplicates', async () => {
    const dump = file('dlq.json', {
      Messages: [
        { MessageId: 'm1', Body: JSON.stringify(eventLike('healthlake-create-patient', 'rp-1', 'rp-a')) },
        {
          MessageId: 'm2',
          Body: JSON.stringify(failureRecord(eventLike('healthlake-update-patient', 'rp-2', 'rp-a'))),
        },
        {
          MessageId: 'm3',
          Body: JSON.stringify(
            failureRecord([
              eventLike('healthlake-delete-patient', 'rp-3', 'rp-a'),
              eventLike('healthlake-read-patient', 'rp-4', 'rp-a'),
            ]),
          ),
        },
      ],
    });
    const first = await replay(['--url', broker.url, dump], withToken);
    expect(first).toMatchObject({ code: 0, stderr: '' });
    expect(first.stdout).toBe('accepted 3, duplicates 0, ignored 1\n');
    const again = await replay(['--url', broker.url, dump], withToken);
    expect(again.stdout).toBe('accepted 0, duplicates 3, ignored 1\n');
    expect(again.code).toBe(0);
  });

  it('reads NDJSON and stdin, and the token from the data dir as npm start keeps it', async () => {
    const lines = [
      eventLike('healthlake-create-patient', 'rp-10', 'rp-b'),
      eventLike('healthlake-update-patient', 'rp-11', 'rp-b'),
    ]
      .map((e) => JSON.stringify(e))
      .join('\n');
    const dataDir = join(dir, 'data');
    mkdirSync(dataDir);
    writeFileSync(join(dataDir, 'credentials.json'), kept(INGEST_TOKEN));
    // No BROKER_INGEST_TOKEN: the broker's data dir has it. PORT and HOST as `npm start` reads them.
    const port = new URL(broker.url).port;
    const fromDataDir = await replay(['-'], { BROKER_DATA_DIR: dataDir, PORT: port }, lines);
    expect(fromDataDir).toMatchObject({ code: 0, stdout: 'accepted 2, duplicates 0, ignored 0\n' });
  });

  it('reports what the broker refuses and what it cannot read, sends the rest, and exits 1', async () => {
    const mixed = file(
      'mixed.ndjson',
      [
        JSON.stringify({ not: 'an event' }),
        '{"id": broken',
        JSON.stringify(eventLike('healthlake-create-patient', 'rp-20', 'rp-c')),
      ].join('\n'),
    );
    const run = await replay(['--url', broker.url, mixed, join(dir, 'missing.json')], withToken);
    expect(run.code).toBe(1);
    expect(run.stdout).toBe('accepted 1, duplicates 0, ignored 0\n');
    const errors = run.stderr.trim().split('\n');
    expect(errors).toHaveLength(3);
    expect(errors[0]).toMatch(/^.*mixed\.ndjson:2: not sent: not JSON \(/);
    expect(errors[1]).toMatch(/^.*mixed\.ndjson:1: refused \(400\): .+/);
    expect(errors[2]).toMatch(/^.*missing\.json: not read: no such file or directory \(ENOENT\)$/);
  });

  it('sends the rest of an array when the broker refuses one event in it, naming that one', async () => {
    const events = [
      eventLike('healthlake-create-patient', 'rp-40', 'rp-e'),
      { not: 'an event' },
      eventLike('healthlake-update-patient', 'rp-41', 'rp-e'),
    ];
    const run = await replay(['--url', broker.url, file('array.json', events)], withToken);
    expect(run.code).toBe(1);
    expect(run.stdout).toBe('accepted 2, duplicates 0, ignored 0\n');
    expect(run.stderr).toMatch(/^.*array\.json#1: refused \(400\): .+\n$/);
  });

  it('sends the HealthLake writes of a gzipped CloudTrail log file, once: a second run finds them duplicates', async () => {
    const detail = (fixture: string, eventID: string, resourceId: string) => ({
      ...(eventLike(fixture, `unused-${eventID}`, resourceId) as { detail: Record<string, unknown> }).detail,
      eventID,
    });
    const trail = {
      Records: [
        detail('healthlake-create-patient', 'ct-1', 'rp-f'),
        { ...detail('healthlake-read-patient', 'ct-2', 'rp-f'), readOnly: true },
        { eventVersion: '1.09', eventSource: 's3.amazonaws.com', eventName: 'GetObject', eventID: 'ct-3' },
        detail('healthlake-update-patient', 'ct-4', 'rp-f'),
        // A failed call: sent, and the broker ignores it.
        detail('healthlake-create-patient-failed', 'ct-5', 'rp-f'),
      ],
    };
    const path = join(dir, '111122223333_CloudTrail_us-east-1_20261129T1000Z_abc.json.gz');
    writeFileSync(path, gzipSync(JSON.stringify(trail)));
    const first = await replay(['--url', broker.url, path], withToken);
    expect(first.code).toBe(0);
    expect(first.stdout).toBe('accepted 2, duplicates 0, ignored 1\n');
    expect(first.stderr.trim().split('\n')).toEqual([
      `${path}: left out 1 read-only HealthLake calls`,
      `${path}: left out 1 calls to other services than HealthLake`,
    ]);
    const again = await replay(['--url', broker.url, path], withToken);
    expect(again.stdout).toBe('accepted 0, duplicates 2, ignored 1\n');
    // A gzip file cut short: said, and the rest goes on.
    const cut = join(dir, 'cut.json.gz');
    writeFileSync(cut, gzipSync(JSON.stringify(trail)).subarray(0, 40));
    const broken = await replay(['--url', broker.url, cut], withToken);
    expect(broken.code).toBe(1);
    expect(broken.stderr).toMatch(/cut\.json\.gz: not read: a gzip file that does not unzip \(.+\)\n$/);
  });

  it('stops at once when the broker refuses the token, without printing it', async () => {
    const one = file('one.json', eventLike('healthlake-create-patient', 'rp-30', 'rp-d'));
    const run = await replay(['--url', broker.url, one, one], { BROKER_INGEST_TOKEN: 'wrong-token-0123456789abcdef' });
    expect(run.code).toBe(1);
    expect(run.stderr).toBe(
      `the broker at ${broker.url} refused the ingest token (401): nothing more sent (a broker started with BROKER_INGEST_TOKEN uses that, not the one its credentials.json keeps)\n`,
    );
    expect(run.stdout).toBe('accepted 0, duplicates 0, ignored 0\n');
    expect(`${run.stdout}${run.stderr}`).not.toContain('wrong-token');
  });

  it('says what is missing before sending anything', async () => {
    expect(await replay([], withToken)).toMatchObject({
      code: 1,
      stderr: 'no file given; usage: npm run replay -- [--url BASE] FILE...\n',
    });
    // Neither a token that no header can carry, nor a kept file that is no JSON, is quoted.
    const multiline = await replay(['x.json'], { BROKER_INGEST_TOKEN: 'fsbi_SECRETPART1\nSECRETPART2' });
    expect(multiline).toMatchObject({
      code: 1,
      stderr: 'BROKER_INGEST_TOKEN: must be visible ASCII with no spaces (it comes in an Authorization header)\n',
    });
    const dataDir = join(dir, 'spaced');
    mkdirSync(dataDir);
    writeFileSync(join(dataDir, 'credentials.json'), kept('fsbi_SECRETPART4 SECRETPART5'));
    // The kept file read as the broker reads it, with the broker's words.
    const fix =
      'correct it, or delete it to have new credentials generated (clients then need the new API key and ingest token)';
    const spaced = await replay(['x.json'], { BROKER_DATA_DIR: dataDir });
    expect(spaced).toMatchObject({
      code: 1,
      stderr: `BROKER_DATA_DIR: ${join(dataDir, 'credentials.json')} is not a credentials file: ingestToken must be visible ASCII with no spaces (it comes in an Authorization header): ${fix}\n`,
    });
    const broken = join(dir, 'broken');
    mkdirSync(broken);
    writeFileSync(join(broken, 'credentials.json'), '{"ingestToken": fsbi_SECRETPART3}');
    const unreadable = await replay(['x.json'], { BROKER_DATA_DIR: broken });
    expect(unreadable).toMatchObject({
      code: 1,
      stderr: `BROKER_DATA_DIR: ${join(broken, 'credentials.json')} is not valid JSON: ${fix}\n`,
    });
    const noToken = await replay(['x.json'], { BROKER_DATA_DIR: join(dir, 'nowhere') });
    expect(noToken.code).toBe(1);
    expect(noToken.stderr).toMatch(
      /^no ingest token: set BROKER_INGEST_TOKEN, or run where the broker keeps .*credentials\.json\n$/,
    );
  });
});
