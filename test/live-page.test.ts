import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type BrowserContext, chromium, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { API_KEYS, type BrokerProcess, INGEST_TOKEN, startBroker } from './support/broker-process.js';
import { Client, eventLike } from './support/fhir-client.js';

/**
 * The `/live` page in real headless Chromium against the real broker process: the page creates a
 * subscription with the key typed into it, binds a WebSocket, shows only the resource types it
 * watches, and after a dropped socket reconnects and catches up on exactly the events it missed.
 * Its strict Content-Security-Policy must hold: no console errors, no CSP violations.
 *
 * Chromium is not optional: CI (`.ci/run`) installs the Debian package, so a missing browser fails
 * this test instead of skipping it.
 */

const CHROMIUM = '/usr/bin/chromium';
const WAIT = 10_000;

// Runs before the page's own script: keeps every WebSocket the page opens and every frame it
// sends, and records CSP violations (they are events, not always console messages).
const INIT_SCRIPT = `(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.__sent = [];
  window.__csp = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }
    send(data) {
      window.__sent.push(String(data));
      return super.send(data);
    }
  };
  document.addEventListener('securitypolicyviolation', (e) => {
    window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || ''));
  });
})();`;

/** `promise`, or a clear failure after `ms`. */
async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

interface Row {
  number: string | null;
  cells: string[];
}

describe('/live page in headless Chromium (real server)', () => {
  let broker: BrokerProcess | undefined;
  let context: BrowserContext | undefined;
  let page: Page;
  let ingest: Client;
  const userDataDir = mkdtempSync(join(tmpdir(), 'fsb-chromium-'));
  const consoleErrors: string[] = [];
  const offHost: string[] = [];
  let counter = 0;
  // While set, the page's next request for a binding token is held: the test decides when it reconnects.
  let hold: { arrived: () => void; released: Promise<void> } | undefined;
  const tokenRequests: string[] = [];

  beforeAll(async () => {
    // Without a browser every test fails with the reason (see requireChromium), none is skipped.
    if (!existsSync(CHROMIUM)) return;
    broker = await startBroker();
    ingest = new Client(broker.url, API_KEYS.alice);
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
        '--disable-quic',
      ],
      viewport: { width: 1000, height: 700 },
      timeout: 20_000,
    });
    context.setDefaultTimeout(WAIT);
    const origin = new URL(broker.url).host;
    // Nothing but the broker on 127.0.0.1: anything else is recorded and refused.
    await context.route(
      (url) => url.host !== origin,
      (route) => {
        offHost.push(route.request().url());
        return route.abort();
      },
    );
    page = context.pages()[0] ?? (await context.newPage());
    page.on('console', (msg) => {
      if (msg.type() === 'error') consoleErrors.push(msg.text());
    });
    page.on('pageerror', (err) => consoleErrors.push(`pageerror: ${err.message}`));
    await page.addInitScript(INIT_SCRIPT);
    await page.route('**/$get-ws-binding-token', async (route) => {
      tokenRequests.push(route.request().method());
      const h = hold;
      if (h !== undefined) {
        h.arrived();
        await h.released;
      }
      await route.continue();
    });
  }, 45_000);

  afterAll(async () => {
    await context?.close().catch(() => {});
    await broker?.kill('SIGTERM');
    rmSync(userDataDir, { recursive: true, force: true });
  });

  const requireChromium = () => {
    if (!existsSync(CHROMIUM)) {
      throw new Error(
        `Chromium is required at ${CHROMIUM} for the /live page test and is missing. ` +
          'Install it with `apt-get install -y chromium` (.ci/run does this in CI).',
      );
    }
  };
  const post = async (fixture: string, resourceId: string) => {
    counter++;
    const res = await ingest.postEvents(eventLike(fixture, `live-${counter}`, resourceId), INGEST_TOKEN);
    expect(res.status).toBe(202);
    expect(res.body.accepted).toBe(1);
  };
  const rows = async (): Promise<Row[]> => {
    const trs = page.locator('#events tr');
    const out: Row[] = [];
    for (let i = 0; i < (await trs.count()); i++) {
      const tr = trs.nth(i);
      out.push({ number: await tr.getAttribute('data-event-number'), cells: await tr.locator('td').allTextContents() });
    }
    return out;
  };
  const patientRow = (id: string) =>
    page
      .locator('#events tr')
      .filter({ has: page.locator('td.focus', { hasText: `/Patient/${id}` }) })
      .filter({ has: page.locator('td', { hasText: /^update$/ }) });
  const screenshot = async (name: string) => {
    const dir = mkdtempSync(join(tmpdir(), 'fsb-live-shot-'));
    const path = process.env.LIVE_PAGE_SCREENSHOT_DIR
      ? join(process.env.LIVE_PAGE_SCREENSHOT_DIR, `${name}.png`)
      : join(dir, `${name}.png`);
    try {
      await page.screenshot({ path, fullPage: true, timeout: WAIT });
      const png = readFileSync(path);
      expect(png.length).toBeGreaterThan(1000);
      expect(png.subarray(1, 4).toString('latin1')).toBe('PNG');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };
  const pageEval = <T>(expression: string): Promise<T> => page.evaluate(expression) as Promise<T>;
  const expectCleanPage = async () => {
    expect(await pageEval<string[]>('window.__csp')).toEqual([]);
    expect(consoleErrors).toEqual([]);
    expect(offHost).toEqual([]);
  };

  it('watches Patient changes live and shows nothing else', async () => {
    requireChromium();
    // Opened at the broker's root, as a user does after `npm start`: redirected to the page.
    const res = await page.goto(`${broker!.url}/`, { waitUntil: 'load', timeout: WAIT });
    expect(res?.request().redirectedFrom()?.url()).toBe(`${broker!.url}/`);
    expect(page.url()).toBe(`${broker!.url}/live`);
    expect(res?.status()).toBe(200);
    expect(res?.headers()['content-security-policy']).toContain("default-src 'none'");
    await expect(page.title()).resolves.toContain('Live changes');

    await page.fill('#apiKey', API_KEYS.alice);
    expect(await page.isChecked('#types input[value=Patient]')).toBe(true);
    expect(await page.isChecked('#types input[value=Observation]')).toBe(false);
    await page.click('#connect');
    await page.waitForSelector('#state[data-state=live]', { timeout: WAIT });
    expect(await page.textContent('#state')).toBe('live');
    expect(await page.textContent('#log')).toMatch(/^Subscription \S+ watches Patient\.$/);

    // An Observation change first: the page watches Patient only, so it must never show up.
    await post('healthlake-create-observation', 'live-obs-1');
    await post('healthlake-update-patient', 'live-patient-1');
    await patientRow('live-patient-1').waitFor({ state: 'visible', timeout: WAIT });

    const shown = await rows();
    expect(shown).toHaveLength(1);
    const [first] = shown;
    expect(first?.number).toBe('1');
    expect(first?.cells[0]).toBe('1');
    expect(first?.cells[2]).toBe('update');
    expect(first?.cells[3]).toMatch(/^https:\/\/healthlake\.[^ ]+\/r4\/Patient\/live-patient-1$/);
    expect(first?.cells[1]).not.toBe('');
    expect(shown.some((r) => r.cells.join(' ').includes('Observation'))).toBe(false);

    await screenshot('live-first-event');
    await expectCleanPage();
  });

  it('reconnects after a dropped socket and catches up on exactly the missed events', async () => {
    requireChromium();
    expect(await rows()).toHaveLength(1);
    let arrived!: () => void;
    let release!: () => void;
    const tokenAsked = new Promise<void>((resolve) => {
      arrived = resolve;
    });
    hold = {
      arrived,
      released: new Promise<void>((resolve) => {
        release = resolve;
      }),
    };
    try {
      expect(await pageEval<number>('window.__sockets.length')).toBe(1);
      await page.evaluate('window.__sockets.at(-1).close()');
      await page.waitForSelector('#state[data-state=reconnecting]', { timeout: WAIT });
      expect(await page.textContent('#log')).toMatch(/^Connection closed \(\d+\)\.$/);
      // The page is about to reconnect (after its backoff) and is held before it can.
      await within(tokenAsked, WAIT, 'the page to ask for a new binding token');
      expect(await page.getAttribute('#state', 'data-state')).toBe('reconnecting');

      // Missed for certain. A 202 means matched, numbered (2 and 3 for this subscription) and stored.
      await post('healthlake-update-patient', 'live-patient-2');
      await post('healthlake-update-patient', 'live-patient-3');
    } finally {
      hold = undefined;
      release();
    }

    await patientRow('live-patient-3').waitFor({ state: 'visible', timeout: WAIT });
    await page.waitForSelector('#state[data-state=live]', { timeout: WAIT });
    expect(await page.textContent('#log')).toMatch(/^Reconnected to subscription \S+\.$/);

    const shown = await rows();
    // New rows are prepended: newest first.
    expect(shown.map((r) => r.number)).toEqual(['3', '2', '1']);
    expect(shown.map((r) => r.cells[0])).toEqual(['3', '2', '1']);
    expect(shown.map((r) => r.cells[2])).toEqual(['update', 'update', 'update']);
    expect(shown.map((r) => r.cells[3]?.split('/').pop())).toEqual([
      'live-patient-3',
      'live-patient-2',
      'live-patient-1',
    ]);

    // It really was a catch-up: a second socket that bound with the last number it had seen.
    expect(await pageEval<number>('window.__sockets.length')).toBe(2);
    expect(tokenRequests).toEqual(['POST', 'POST']);
    const binds = (await pageEval<string[]>('window.__sent')).map(
      (m) => JSON.parse(m) as { type: string; payload: { lastEventNumber?: number } },
    );
    // The first bind asks from 0: what happened between creating the subscription and binding (or
    // a drop before the first event was shown) is replayed, not lost.
    expect(binds.map((b) => [b.type, b.payload.lastEventNumber])).toEqual([
      ['bind-with-token', 0],
      ['bind-with-token', 1],
    ]);

    // No late duplicates either.
    await page.waitForTimeout(300);
    expect((await rows()).map((r) => r.number)).toEqual(['3', '2', '1']);

    await screenshot('live-after-reconnect');
    await expectCleanPage();
  });

  it('closing the page deletes its subscription', async () => {
    requireChromium();
    const live = async (): Promise<string[]> => {
      const res = await ingest.call('GET', '/fhir/Subscription');
      return ((res.body.entry as { resource: { id: string; reason?: string } }[] | undefined) ?? [])
        .filter((e) => e.resource.reason === 'Live feed page')
        .map((e) => e.resource.id);
    };
    const before = await live();
    const other = await (context as BrowserContext).newPage();
    await other.goto(`${broker!.url}/live`, { waitUntil: 'load', timeout: WAIT });
    await other.fill('#apiKey', API_KEYS.alice);
    await other.click('#connect');
    await other.waitForSelector('#state[data-state=live]', { timeout: WAIT });
    const opened = (await live()).filter((id) => !before.includes(id));
    expect(opened).toHaveLength(1);
    await other.close({ runBeforeUnload: true });
    await expect.poll(live, { timeout: WAIT }).toEqual(before);
  });

  it('shows each event once and in number order, whatever order they arrive in', async () => {
    requireChromium();
    // On AWS a catch-up and a live event can reach a socket from two instances side by side: 6
    // before 4 and 5, and 4 twice. The frames are handed to the page's socket as if they came.
    const bundle = (n: number) =>
      JSON.stringify({
        resourceType: 'Bundle',
        type: 'history',
        entry: [
          {
            resource: {
              resourceType: 'Parameters',
              parameter: [
                { name: 'type', valueCode: 'event-notification' },
                {
                  name: 'notification-event',
                  part: [
                    { name: 'event-number', valueString: String(n) },
                    { name: 'timestamp', valueInstant: '2026-11-27T10:00:00Z' },
                    { name: 'focus', valueReference: { reference: `${broker?.url}/Patient/out-of-order-${n}` } },
                  ],
                },
              ],
            },
          },
          {
            fullUrl: `${broker?.url}/Patient/out-of-order-${n}`,
            request: { method: 'PUT', url: `Patient/out-of-order-${n}` },
          },
        ],
      });
    for (const n of [6, 4, 4, 5, 6]) {
      await page.evaluate(
        `window.__sockets.at(-1).dispatchEvent(new MessageEvent('message', { data: ${JSON.stringify(bundle(n))} }))`,
      );
    }
    expect((await rows()).map((r) => r.number)).toEqual(['6', '5', '4', '3', '2', '1']);
    // A reconnect asks from the highest number with none missing below it.
    expect(await pageEval<number>('window.__sockets.length')).toBe(2);
    await page.evaluate('window.__sockets.at(-1).close()');
    await page.waitForSelector('#state[data-state=reconnecting]', { timeout: WAIT });
    await page.waitForSelector('#state[data-state=live]', { timeout: WAIT });
    const binds = (await pageEval<string[]>('window.__sent')).map(
      (m) => JSON.parse(m) as { payload: { lastEventNumber?: number } },
    );
    expect(binds.map((b) => b.payload.lastEventNumber)).toEqual([0, 1, 6]);
    await expectCleanPage();
  });
});
