import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, expect, it } from 'vitest';
import { startNodeFlags } from '../src/start-command.js';
import { API_KEYS, INGEST_TOKEN, newDataDir, startBroker } from './support/broker-process.js';
import { tempDir } from './support/temp-dirs.js';

/**
 * `npm start` as a service manager or a container runtime stops it: SIGTERM to npm alone, not to
 * its process group. The broker must hear it and shut down, not be left running as an orphan.
 */

let npm: ChildProcess | undefined;
afterEach(() => {
  // npm passes no SIGKILL on: its broker first, so none is left writing into a removed data dir.
  for (const pid of npm?.pid === undefined ? [] : childrenOf(npm.pid)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone already
    }
  }
  npm?.kill('SIGKILL');
});

/** The pids of `pid`'s children (Linux). */
function childrenOf(pid: number): number[] {
  const file = `/proc/${pid}/task/${pid}/children`;
  return existsSync(file)
    ? readFileSync(file, 'utf8')
        .trim()
        .split(/\s+/)
        .filter((s) => s !== '')
        .map(Number)
    : [];
}

it('stops the broker gracefully when npm start gets SIGTERM', async () => {
  const dataDir = tempDir('fsb-npm-');
  npm = spawn('npm', ['start', '--silent'], {
    env: { ...process.env, PORT: '0', HOST: '127.0.0.1', BROKER_DATA_DIR: dataDir, BROKER_LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const child = npm;
  const logs: string[] = [];
  const listening = new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`npm start exited early (${code})`)));
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
      logs.push(line);
      if (line.includes('"msg":"listening"')) resolve();
    });
  });
  await listening;
  const [node] = childrenOf(child.pid as number);
  expect(node).toBeDefined();
  expect(readFileSync(`/proc/${node}/cmdline`, 'utf8').split('\0')[0]).toMatch(/node$/);

  // 'close': npm has exited and its output (the broker's) has been read to the end.
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  child.kill('SIGTERM');
  await exited;
  // The broker was npm's own child, got the signal, and is gone (npm reaped it) after its clean stop.
  for (let i = 0; i < 100 && existsSync(`/proc/${node}`); i++) await new Promise((r) => setTimeout(r, 50));
  expect(existsSync(`/proc/${node}`)).toBe(false);
  expect(logs.some((l) => l.includes('"msg":"shutting down"') && l.includes('SIGTERM'))).toBe(true);
});

it('names HOST and PORT when it cannot listen there', async () => {
  await expect(startBroker({ HOST: '999.1.1.1' })).rejects.toThrow(/cannot listen on HOST=999\.1\.1\.1 PORT=0/);
});

it('says where it is, and warns when HOST is a wildcard that references would name', async () => {
  const WILDCARD = 'HOST is a wildcard address, and references and the WebSocket URL name it: set BROKER_PUBLIC_URL';
  // Generated credentials, so the start banner is printed; HOST=0.0.0.0 as in a container.
  const b = await startBroker({ HOST: '0.0.0.0', BROKER_API_KEYS: '' });
  try {
    const warned = await b.waitForLog((r) => r.msg === WILDCARD, 'the wildcard warning');
    const publicUrl = `http://0.0.0.0:${new URL(b.url).port}`;
    expect(warned).toMatchObject({ level: 'warn', host: '0.0.0.0', publicUrl });
    for (let i = 0; i < 100 && !b.stderr.some((l) => l.startsWith('Broker at ')); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(b.stderr).toContain(`Broker at ${publicUrl} (live page: ${publicUrl}/live)`);
  } finally {
    await b.kill();
  }
  // With BROKER_PUBLIC_URL set, nothing to warn about.
  const named = await startBroker({ HOST: '0.0.0.0', BROKER_PUBLIC_URL: 'http://broker.internal:8080' });
  try {
    await named.waitForLog((r) => r.msg === 'listening', 'listening');
    expect(named.logs.filter((r) => r.msg === WILDCARD)).toEqual([]);
    // No credentials generated (both set): the banner still says where the broker is.
    for (let i = 0; i < 100 && !named.stderr.some((l) => l.startsWith('Broker at ')); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(named.stderr).toContain(
      'Broker at http://broker.internal:8080 (live page: http://broker.internal:8080/live)',
    );
    expect(named.stderr.some((l) => l.startsWith('Local credentials'))).toBe(false);
  } finally {
    await named.kill();
  }
});

/** Runs the broker as `npm start` does and returns its exit code and all it wrote to stderr. */
async function failedStart(env: Record<string, string>, dataDir = newDataDir()): Promise<[number | null, string]> {
  const child = spawn(process.execPath, [...startNodeFlags(), '--import', 'tsx', 'src/main.ts'], {
    env: {
      PATH: process.env.PATH ?? '',
      PORT: '0',
      BROKER_DATA_DIR: dataDir,
      BROKER_API_KEYS: `alice:${API_KEYS.alice}`,
      BROKER_INGEST_TOKEN: INGEST_TOKEN,
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  // A broker that starts after all is stopped at once, so that the test fails instead of hanging.
  createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
    if (line.includes('"msg":"listening"')) child.kill('SIGKILL');
  });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  // 'close': exited, and stderr read to the end.
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve));
  return [code, stderr];
}

const secretInData = 'fsbi_kept-ingest-token-0123456789';

it.each<[string, Record<string, string>, RegExp, ((dir: string) => void)?]>([
  [
    'an API key written token:clientId, without echoing the token',
    { BROKER_API_KEYS: 'fsb_Zk3qL9xVt2Wm8RbN4cYp:local' },
    /^BROKER_API_KEYS: entry 1 has a token \(after its first colon\) shorter than 16 characters; entries are clientId:token$/,
  ],
  [
    'a CIDR with a bad prefix',
    { BROKER_ENDPOINT_ALLOWLIST: '10.0.0.0/33' },
    /^BROKER_ENDPOINT_ALLOWLIST: entry 10\.0\.0\.0\/33: bad prefix$/,
  ],
  [
    'a CIDR without an address',
    { BROKER_ENDPOINT_ALLOWLIST: 'foo/8' },
    /^BROKER_ENDPOINT_ALLOWLIST: entry foo\/8: a CIDR needs an IP address$/,
  ],
  [
    'a topics directory that does not exist',
    { BROKER_TOPICS_DIR: '/nonexistent' },
    /^BROKER_TOPICS_DIR: cannot read the directory \/nonexistent: no such file or directory \(ENOENT\)$/,
  ],
  [
    'a data directory that cannot be made',
    { BROKER_DATA_DIR: '/etc/passwd/x' },
    /^BROKER_DATA_DIR: cannot create the directory \/etc\/passwd\/x: not a directory \(ENOTDIR\)$/,
  ],
  [
    'a truncated credentials file, without printing it',
    {},
    /^BROKER_DATA_DIR: \S+\/credentials\.json is not valid JSON: correct it, or delete it to have new credentials generated/,
    (dir) => writeFileSync(join(dir, 'credentials.json'), `{"apiClient":{"clientId":"local","token":"${secretInData}`),
  ],
  [
    'a public URL with a port out of range',
    { BROKER_PUBLIC_URL: 'https://broker.example.org:99999/fhir' },
    /^BROKER_PUBLIC_URL: https:\/\/broker\.example\.org:99999\/fhir is not a valid URL/,
  ],
  [
    'an API key that is also the ingest token, without echoing it',
    { BROKER_INGEST_TOKEN: API_KEYS.alice },
    /^BROKER_INGEST_TOKEN: is the same as the token of entry 1 of BROKER_API_KEYS: /,
  ],
])('refuses to start on %s, in one line that names the variable', async (_what, env, message, prepare) => {
  const dataDir = newDataDir();
  prepare?.(dataDir);
  const [code, stderr] = await failedStart(env, dataDir);
  expect(code).toBe(1);
  const lines = stderr.split('\n').filter((l) => l !== '');
  expect(lines).toHaveLength(1);
  expect(lines[0]?.replace(/^fhir-subscription-broker failed to start: /, '')).toMatch(message);
  for (const secret of ['fsb_Zk3qL9xVt2Wm8RbN4cYp', secretInData, API_KEYS.alice]) expect(stderr).not.toContain(secret);
});
