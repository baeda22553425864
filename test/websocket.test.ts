import type { Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BindingTokens } from '../src/delivery/ws-binding-token.js';
import { API_KEYS, type BrokerProcess, INGEST_TOKEN, newDataDir, startBroker } from './support/broker-process.js';
import {
  Client,
  eventLike,
  eventNumbers,
  focusOf,
  type Json,
  statusOf,
  topicSubscription,
} from './support/fhir-client.js';
import { validateFhir } from './support/fhir-schema.js';
import { WsClient } from './support/ws-client.js';

/**
 * The websocket channel against the real server process with real `ws` clients: binding with both
 * message forms, handshakes, matching events only, heartbeats, refusals, R4 bind/ping, catch-up
 * after a reconnect, and hostile frames that close only the offending socket.
 */

const WS_SECRET = 'ws-token-secret-for-tests-0123456789abcdef';
const HL = 'https://healthlake.us-east-1.amazonaws.com/datastore/abcdef01234567890abcdef012345678/r4';

const subscriptionRef = (bundle: Json): string =>
  String((statusOf(bundle).params.get('subscription')?.valueReference as Json | undefined)?.reference);

const wsSubscription = (topic: string, options: { filters?: string[]; channel?: Json } = {}): Json => {
  const sub = topicSubscription(topic, 'unused', options);
  const { endpoint: _endpoint, ...channel } = sub.channel as Json;
  return { ...sub, channel: { ...channel, type: 'websocket' } };
};

/** Waits until the value of `series` on the broker's `/metrics` passes `ok` (socket processes relay theirs). */
async function waitForMetric(b: BrokerProcess, series: string, ok: (value: number) => boolean): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const res = await fetch(`${b.url}/metrics`, { headers: { authorization: `Bearer ${INGEST_TOKEN}` } });
    const line = (await res.text()).split('\n').find((l) => l.startsWith(`${series} `));
    if (line !== undefined && ok(Number(line.slice(series.length + 1)))) return;
    if (Date.now() > deadline) throw new Error(`${series}: ${line ?? 'no such series'}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

// Both local socket layers: the in-process hub (default) and two socket processes.
describe.each([
  ['in-process hub', '0'],
  ['2 socket processes', '2'],
])('websocket channel (real server, real ws clients, %s)', (_mode, wsProcesses) => {
  let broker: BrokerProcess;
  let alice: Client;
  let bob: Client;
  let counter = 0;
  const sockets: WsClient[] = [];

  beforeAll(async () => {
    broker = await startBroker({
      BROKER_WS_TOKEN_SECRET: WS_SECRET,
      BROKER_WS_SEND_BUFFER: '4096',
      BROKER_WS_PROCESSES: wsProcesses,
    });
    alice = new Client(broker.url, API_KEYS.alice);
    bob = new Client(broker.url, API_KEYS.bob);
  });
  afterAll(async () => {
    for (const s of sockets) s.close();
    await broker?.kill('SIGTERM');
  });

  const wsUrl = () => `${broker.url.replace('http', 'ws')}/ws`;
  const connect = async (headers: Record<string, string> = {}) => {
    const c = await WsClient.connect(wsUrl(), headers);
    sockets.push(c);
    return c;
  };
  const create = async (sub: Json) => {
    const created = await alice.create(sub);
    await broker.waitForStatus(created.id as string, 'active');
    return created.id as string;
  };
  const tokenFor = async (ids: string[]) => {
    const res = await alice.call(
      'GET',
      `/fhir/Subscription/$get-ws-binding-token?${ids.map((i) => `id=${i}`).join('&')}`,
    );
    expect(res.status).toBe(200);
    return ((res.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
  };
  const token = async (id: string, client: Client = alice) => {
    const res = await client.call('GET', `/fhir/Subscription/${id}/$get-ws-binding-token`);
    expect(res.status).toBe(200);
    return ((res.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
  };
  const patientChange = async (resourceId: string) => {
    counter++;
    const res = await alice.postEvents(
      eventLike('healthlake-update-patient', `ws-${counter}`, resourceId),
      INGEST_TOKEN,
    );
    expect(res.status).toBe(202);
  };
  const notificationsOf = (c: WsClient, sub: string) =>
    c.bundles.filter(
      (b) =>
        statusOf(b).params.get('type')?.valueCode === 'event-notification' && subscriptionRef(b).endsWith(`/${sub}`),
    );
  /** An event for `patientId` reaches socket `c` on subscription `sub`, and `c` is still open. */
  const stillServed = async (c: WsClient, sub: string, patientId: string) => {
    await patientChange(patientId);
    await c.waitFor(() => notificationsOf(c, sub).length === 1, 'the socket still served');
    expect(c.closed).toBeUndefined();
  };
  const turnOff = async (id: string) => {
    const body = (await alice.call('GET', `/fhir/Subscription/${id}`)).body;
    expect((await alice.call('PUT', `/fhir/Subscription/${id}`, { ...body, status: 'off' })).status).toBe(200);
  };
  const handshakesOf = (c: WsClient) =>
    c.bundles
      .filter((b) => statusOf(b).params.get('type')?.valueCode === 'handshake')
      .map((b) => subscriptionRef(b).split('/').pop());

  it('issues binding tokens with the websocket URL', async () => {
    const id = await create(wsSubscription('patient-change'));
    const res = await alice.call('POST', `/fhir/Subscription/${id}/$get-ws-binding-token`);
    const params = Object.fromEntries((res.body.parameter as Json[]).map((p) => [p.name, p]));
    expect(res.body.resourceType).toBe('Parameters');
    expect(params.subscription?.valueString).toBe(id);
    expect(params['websocket-url']?.valueUrl).toBe(wsUrl());
    expect(Date.parse(String(params.expiration?.valueDateTime))).toBeGreaterThan(Date.now());
    expect(String(params.token?.valueString)).toMatch(/^v1\./);
    // Another client's subscription does not exist for it.
    expect((await bob.call('GET', `/fhir/Subscription/${id}/$get-ws-binding-token`)).status).toBe(404);
  });

  it('binds with the text form, sends the handshake, then only matching events', async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=ws-a,ws-b'] }));
    const c = await connect();
    c.send(`bind-with-token ${await token(id)}`);
    await c.waitFor(() => handshakesOf(c).includes(id), 'handshake');
    const handshake = c.bundles[0] as Json;
    expect(statusOf(handshake).params.get('status')?.valueCode).toBe('active');
    expect(validateFhir(handshake)).toEqual([]);

    await patientChange('ws-a');
    await patientChange('not-mine');
    await patientChange('ws-b');
    await c.waitFor(() => notificationsOf(c, id).length === 2, 'two notifications');
    const got = notificationsOf(c, id);
    expect(got.map(eventNumbers)).toEqual([[1], [2]]);
    expect(got.map((b) => statusOf(b).events.map(focusOf))).toEqual([[`${HL}/Patient/ws-a`], [`${HL}/Patient/ws-b`]]);
    for (const b of got) expect(validateFhir(b)).toEqual([]);
  });

  it('binds with the JSON form; several sockets per subscription and several subscriptions per socket', async () => {
    const a = await create(wsSubscription('patient-change', { filters: ['Patient?_id=multi'] }));
    const b = await create(wsSubscription('resource-change', { filters: ['_type=Patient'] }));
    const both = await alice.call('GET', `/fhir/Subscription/$get-ws-binding-token?id=${a}&id=${b}`);
    const bothToken = ((both.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
    const one = await connect();
    const two = await connect();
    one.send(JSON.stringify({ type: 'bind-with-token', payload: { token: bothToken } }));
    two.send(JSON.stringify({ type: 'bind-with-token', payload: { token: await token(a) } }));
    await one.waitFor(() => handshakesOf(one).length === 2, 'two handshakes');
    await two.waitFor(() => handshakesOf(two).length === 1, 'one handshake');
    expect(handshakesOf(one).sort()).toEqual([a, b].sort());

    await patientChange('multi');
    await one.waitFor(() => notificationsOf(one, a).length === 1 && notificationsOf(one, b).length === 1, 'both subs');
    await two.waitFor(() => notificationsOf(two, a).length === 1, 'second socket');

    // unbind one subscription: the socket keeps the other.
    one.send(`unbind ${a}`);
    await one.waitFor(() => one.messages.includes(`unbound ${a}`), 'unbound');
    await patientChange('multi');
    await one.waitFor(() => notificationsOf(one, b).length === 2, 'b still bound');
    await two.waitFor(() => notificationsOf(two, a).length === 2, 'a on the other socket');
    expect(notificationsOf(one, a)).toHaveLength(1);
  });

  it("answers Medplum's JSON keep-alive and unbind-from-token (an expired token too), keeping the socket", async () => {
    const a = await create(wsSubscription('patient-change', { filters: ['Patient?_id=mp-a'] }));
    const b = await create(wsSubscription('patient-change', { filters: ['Patient?_id=mp-b'] }));
    const c = await connect();
    const aToken = await token(a);
    c.send(JSON.stringify({ type: 'bind-with-token', payload: { token: aToken } }));
    c.send(JSON.stringify({ type: 'bind-with-token', payload: { token: await token(b) } }));
    await c.waitFor(() => handshakesOf(c).length === 2, 'two handshakes');
    c.send(JSON.stringify({ type: 'ping' }));
    await c.waitFor(() => c.messages.includes('{"type":"pong"}'), 'the pong');
    // The token that bound a, as Medplum's client sends it when it drops a criteria.
    c.send(JSON.stringify({ type: 'unbind-from-token', payload: { token: aToken } }));
    await c.waitFor(() => c.messages.some((m) => m.includes('"unbound"') && m.includes(a)), 'a unbound');
    await patientChange('mp-a');
    await stillServed(c, b, 'mp-b');
    expect(notificationsOf(c, a)).toHaveLength(0);
    // Expired, it still lets go of what it names; one this broker did not sign is a protocol error.
    const tokens = new BindingTokens(WS_SECRET);
    const expired = tokens.issue({ owner: 'alice', subscriptions: [b], expiresAt: Date.now() - 1000 });
    c.send(JSON.stringify({ type: 'unbind-from-token', payload: { token: expired } }));
    await c.waitFor(() => c.messages.some((m) => m.includes('"unbound"') && m.includes(b)), 'b unbound');
    const foreign = new BindingTokens('another-secret-0123456789abcdefghijkl').issue({
      owner: 'alice',
      subscriptions: [b],
      expiresAt: Date.now() + 60_000,
    });
    const d = await connect();
    d.send(JSON.stringify({ type: 'unbind-from-token', payload: { token: foreign } }));
    expect((await d.waitForClose()).code).toBe(1008);
    expect(c.closed).toBeUndefined();
  });

  it("speaks Medplum's shape on its path: each bundle's status an R5 SubscriptionStatus, the same bundles on /ws as before", async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=mp-shape'] }));
    const medplum = sockets[sockets.push(await WsClient.connect(`${wsUrl()}/subscriptions-r4`)) - 1] as WsClient;
    const plain = await connect();
    for (const c of [medplum, plain])
      c.send(JSON.stringify({ type: 'bind-with-token', payload: { token: await token(id) } }));
    await plain.waitFor(() => handshakesOf(plain).length === 1, 'the handshake on /ws');
    await medplum.waitFor(() => medplum.bundles.length === 1, "the handshake on Medplum's path");
    await patientChange('mp-shape');
    await plain.waitFor(() => notificationsOf(plain, id).length === 1, 'the event on /ws');
    await medplum.waitFor(() => medplum.bundles.length === 2, "the event on Medplum's path");
    const entries = (b: Json | undefined): Json[] => (b?.entry ?? []) as Json[];
    const statuses = medplum.bundles.map((b) => (entries(b)[0]?.resource ?? {}) as Json);
    expect(statuses.map((r) => [r.resourceType, r.type, (r.subscription as Json).reference])).toEqual([
      ['SubscriptionStatus', 'handshake', `Subscription/${id}`],
      ['SubscriptionStatus', 'event-notification', `Subscription/${id}`],
    ]);
    expect(((statuses[1]?.notificationEvent ?? []) as Json[])[0]).toMatchObject({
      eventNumber: '1',
      focus: { reference: `${HL}/Patient/mp-shape` },
    });
    // Everything past the first entry is the bundle /ws has.
    const [sent] = notificationsOf(plain, id);
    expect(entries(medplum.bundles[1]).slice(1)).toEqual(entries(sent).slice(1));
    // Not claiming the backport IG's notification profile, whose first entry is a Parameters.
    expect([medplum.bundles[1]?.meta, sent?.meta]).toEqual([
      undefined,
      expect.objectContaining({ profile: expect.any(Array) }),
    ]);
    expect(((entries(sent)[0]?.resource ?? {}) as Json).resourceType).toBe('Parameters');
  });

  it('refuses a bad, an expired and a foreign token, closing only that socket', async () => {
    const id = await create(wsSubscription('patient-change'));
    const tokens = new BindingTokens(WS_SECRET);
    const cases: [string, string][] = [
      ['not-a-token', 'malformed token'],
      [`${(await token(id)).slice(0, -4)}AAAA`, 'invalid token'],
      [tokens.issue({ owner: 'alice', subscriptions: [id], expiresAt: Date.now() - 1 }), 'token expired'],
      [
        tokens.issue({ owner: 'bob', subscriptions: [id], expiresAt: Date.now() + 60_000 }),
        `unknown subscription ${id}`,
      ],
    ];
    const healthy = await connect();
    healthy.send(`bind-with-token ${await token(id)}`);
    await healthy.waitFor(() => handshakesOf(healthy).length === 1, 'healthy handshake');
    for (const [bad, reason] of cases) {
      const c = await connect();
      c.send(`bind-with-token ${bad}`);
      const closed = await c.waitForClose();
      expect([closed.code, c.messages]).toEqual([4003, [`error ${reason}`]]);
    }
    // Each refusal counted; only the one of a token the broker issued is logged at info: anyone
    // can send a bad token, and one line each would let a reconnect loop fill the log.
    const logged = broker.logs.filter((l) => l.msg === 'websocket bind refused').map((l) => l.reason);
    expect(logged).toContain(`unknown subscription ${id}`);
    for (const [, reason] of cases.slice(0, 3)) expect(logged).not.toContain(reason);
    await patientChange('after-refusals');
    await healthy.waitFor(() => notificationsOf(healthy, id).length >= 1, 'healthy still receives');
    expect(healthy.closed).toBeUndefined();
  });

  it('sends heartbeats over the socket', async () => {
    const id = await create(
      wsSubscription('patient-change', {
        channel: {
          extension: [
            {
              url: 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period',
              valueUnsignedInt: 1,
            },
          ],
        },
      }),
    );
    const c = await connect();
    c.send(`bind-with-token ${await token(id)}`);
    await c.waitFor(
      () => c.bundles.some((b) => statusOf(b).params.get('type')?.valueCode === 'heartbeat'),
      'heartbeat',
      5000,
    );
  });

  it('speaks the classic R4 bind/bound/ping exchange to the owner only', async () => {
    const created = await alice.create({
      resourceType: 'Subscription',
      status: 'requested',
      reason: 'r4',
      criteria: 'Patient?_id=r4-patient',
      channel: { type: 'websocket' },
    });
    const id = created.id as string;
    await broker.waitForStatus(id, 'active');
    const owner = await connect({ authorization: `Bearer ${API_KEYS.alice}` });
    owner.send(`bind ${id}`);
    await owner.waitFor(() => owner.messages.includes(`bound ${id}`), 'bound');
    await patientChange('r4-patient');
    await owner.waitFor(() => owner.messages.includes(`ping ${id}`), 'ping');
    expect(owner.messages).toEqual([`bound ${id}`, `ping ${id}`]);

    for (const headers of [{}, { authorization: `Bearer ${API_KEYS.bob}` }] as Record<string, string>[]) {
      const other = await connect(headers);
      other.send(`bind ${id}`);
      expect((await other.waitForClose()).code).toBe(4003);
    }
    // Turned off: the bound socket is let go, and a new R4 bind is refused like a token bind.
    await turnOff(id);
    await owner.waitFor(() => owner.messages.includes(`unbound ${id}`), 'unbound');
    const late = await connect({ authorization: `Bearer ${API_KEYS.alice}` });
    late.send(`bind ${id}`);
    expect((await late.waitForClose()).code).toBe(4003);
    await expect(WsClient.connect(wsUrl(), { authorization: 'Bearer wrong-key-0123456789' })).rejects.toThrow(
      'upgrade refused: 401',
    );
  });

  it('lets go of the sockets of a subscription that is deleted, turned off or moved to rest-hook', async () => {
    const subs = await Promise.all(
      ['gone-deleted', 'gone-off', 'gone-moved'].map((p) =>
        create(wsSubscription('patient-change', { filters: [`Patient?_id=${p}`] })),
      ),
    );
    const [deleted, off, moved] = subs as [string, string, string];
    const stays = await create(wsSubscription('patient-change', { filters: ['Patient?_id=gone-stays'] }));
    const sockets = await Promise.all(subs.map(() => connect()));
    // One more socket, bound to a deleted one and one that stays, keeps the latter and stays open.
    const both = await connect();
    for (const [i, c] of sockets.entries()) c.send(`bind-with-token ${await token(subs[i] as string)}`);
    both.send(JSON.stringify({ type: 'bind-with-token', payload: { token: await tokenFor([deleted, stays]) } }));
    for (const [i, c] of sockets.entries()) await c.waitFor(() => handshakesOf(c).includes(subs[i]), 'handshake');
    await both.waitFor(() => handshakesOf(both).length === 2, 'two handshakes');

    expect((await alice.call('DELETE', `/fhir/Subscription/${deleted}`)).status).toBe(204);
    await turnOff(off);
    const movedBody = (await alice.call('GET', `/fhir/Subscription/${moved}`)).body;
    const restHook = {
      ...movedBody,
      channel: { ...(movedBody.channel as Json), type: 'rest-hook', endpoint: 'http://127.0.0.1:9/x' },
    };
    expect((await alice.call('PUT', `/fhir/Subscription/${moved}`, restHook)).status).toBe(200);

    for (const [i, c] of sockets.entries()) {
      const closed = await c.waitForClose();
      expect(closed.code).toBe(4003);
      const unbound = JSON.parse(c.messages.at(-1) as string) as Json;
      expect(unbound).toMatchObject({ type: 'unbound', payload: { subscription: subs[i] } });
    }
    await both.waitFor(() => both.messages.some((m) => m.includes('"unbound"')), 'the unbound message');
    await stillServed(both, stays, 'gone-stays');
  });

  it('catches up a bind that arrives in one read with an unbind before it', async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=unbind-bind'] }));
    for (let i = 0; i < 3; i++) await patientChange('unbind-bind');
    let stored = 3;
    for (const unbind of ['unbind', `unbind ${id}`, JSON.stringify({ type: 'unbind' })]) {
      const bind = `bind-with-token ${await token(id)} 0`;
      const c = await connect();
      // Both frames in one TCP write, as two sends that coalesce: the broker reads them together.
      const raw = (c.socket as unknown as { _socket: Socket })._socket;
      raw.cork();
      c.send(unbind);
      c.send(bind);
      raw.uncork();
      await c.waitFor(() => notificationsOf(c, id).length === stored, `the catch-up after ${unbind}`);
      expect(handshakesOf(c)).toEqual([id]);
      await patientChange('unbind-bind');
      stored++;
      await c.waitFor(() => notificationsOf(c, id).length === stored, 'the next live event');
      expect(notificationsOf(c, id).flatMap(eventNumbers)).toEqual(Array.from({ length: stored }, (_, i) => i + 1));
      c.close();
    }
  });

  it('does not skip live events for a client claiming more than the subscription has numbered', async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=claims'] }));
    const c = await connect();
    c.send(JSON.stringify({ type: 'bind-with-token', payload: { token: await token(id), lastEventNumber: 100 } }));
    await c.waitFor(() => handshakesOf(c).includes(id), 'handshake');
    await patientChange('claims');
    await c.waitFor(() => notificationsOf(c, id).length === 1, 'the live event');
    expect(notificationsOf(c, id).map(eventNumbers)).toEqual([[1]]);
  });

  it('answers the first frame of every new connection (the hand-off to a socket process loses nothing)', async () => {
    // Smoke test of the hand-off: before the main process stopped reading a handed-off socket, a
    // script doing this outside vitest lost 6 of 300 first frames; this loop does not reproduce
    // that race reliably, so it guards the path, not the timing.
    for (let i = 0; i < 150; i++) {
      const c = await connect();
      c.send('bind no-such-subscription');
      const closed = await c.waitForClose();
      expect([closed.code, c.messages.length]).toEqual([4003, 1]);
    }
  });

  it('catches a reconnecting client up with exactly the events it missed, then goes live', async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=cu'] }));
    const first = await connect();
    first.send(`bind-with-token ${await token(id)}`);
    await first.waitFor(() => handshakesOf(first).length === 1, 'handshake');
    await patientChange('cu');
    await patientChange('cu');
    await first.waitFor(() => notificationsOf(first, id).length === 2, 'first two');
    first.close();
    await first.waitForClose();

    await patientChange('cu');
    await patientChange('cu');
    await patientChange('cu');
    const again = await connect();
    again.send(JSON.stringify({ type: 'bind-with-token', payload: { token: await token(id), lastEventNumber: 2 } }));
    await again.waitFor(() => notificationsOf(again, id).length === 3, 'caught up');
    await patientChange('cu');
    await again.waitFor(() => notificationsOf(again, id).length === 4, 'live');
    expect(handshakesOf(again)).toEqual([id]);
    expect(notificationsOf(again, id).map(eventNumbers)).toEqual([[3], [4], [5], [6]]);
  });

  it('catches up across pages when more than a page of events was missed', async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=many'] }));
    const events = Array.from({ length: 1200 }, (_, i) => eventLike('healthlake-update-patient', `many-${i}`, 'many'));
    expect((await alice.postEvents(events.slice(0, 1000), INGEST_TOKEN)).status).toBe(202);
    expect((await alice.postEvents(events.slice(1000), INGEST_TOKEN)).status).toBe(202);
    const c = await connect();
    c.send(JSON.stringify({ type: 'bind-with-token', payload: { token: await token(id), lastEventNumber: 0 } }));
    await c.waitFor(() => notificationsOf(c, id).length === 1200, 'all 1,200', 30_000);
    expect(notificationsOf(c, id).flatMap(eventNumbers)).toEqual(Array.from({ length: 1200 }, (_, i) => i + 1));
  });

  it('binds a token naming 100 subscriptions, the most one may name', async () => {
    const ids = await Promise.all(
      Array.from({ length: 100 }, () => create(wsSubscription('patient-change', { filters: ['Patient?_id=hundred'] }))),
    );
    const hundred = await tokenFor(ids);
    expect(hundred.length).toBeGreaterThan(4096);
    const c = await connect();
    c.send(`bind-with-token ${hundred}`);
    await c.waitFor(() => handshakesOf(c).length === 100, '100 handshakes');
    expect(new Set(handshakesOf(c))).toEqual(new Set(ids));
    expect(c.closed).toBeUndefined();
  });

  it('binds 30 subscriptions with a token each, sent at once (the IG flow), without calling it a flood', async () => {
    const ids = await Promise.all(
      Array.from({ length: 30 }, () => create(wsSubscription('patient-change', { filters: ['Patient?_id=thirty'] }))),
    );
    const tokens = await Promise.all(ids.map((id) => token(id)));
    const c = await connect();
    for (const t of tokens) c.send(`bind-with-token ${t}`);
    await c.waitFor(() => handshakesOf(c).length === 30, '30 handshakes');
    expect(c.closed).toBeUndefined();
  });

  it('keeps a bound socket and its bindings when a later bind on it is refused', async () => {
    const kept = await create(wsSubscription('patient-change', { filters: ['Patient?_id=kept-binding'] }));
    const gone = await create(wsSubscription('patient-change', { filters: ['Patient?_id=kept-binding'] }));
    const c = await connect();
    c.send(`bind-with-token ${await token(kept)}`);
    await c.waitFor(() => handshakesOf(c).length === 1, 'handshake');
    // A token fetched before one of its subscriptions was deleted: refused, said, and the socket stays.
    const both = await tokenFor([kept, gone]);
    expect((await alice.call('DELETE', `/fhir/Subscription/${gone}`)).status).toBe(204);
    c.send(`bind-with-token ${both}`);
    await c.waitFor(() => c.messages.some((t) => t === `error unknown subscription ${gone}`), 'the refusal');
    // Nor does an R4 bind refused (no API key on this socket) cost it its binding.
    c.send(`bind ${gone}`);
    await c.waitFor(() => c.messages.some((t) => t.startsWith(`error ${gone} unknown subscription`)), 'the R4 refusal');
    await stillServed(c, kept, 'kept-binding');
    // A socket with no binding is still closed by a refusal (4003).
    const fresh = await connect();
    fresh.send(`bind-with-token ${both}`);
    expect((await fresh.waitForClose()).code).toBe(4003);
  });

  it('closes sockets that send binary junk, huge or unknown messages or floods, and no other', async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=survivor'] }));
    const healthy = await connect();
    healthy.send(`bind-with-token ${await token(id)}`);
    await healthy.waitFor(() => handshakesOf(healthy).length === 1, 'handshake');

    const binary = await connect();
    binary.socket.send(Buffer.from([0, 1, 2, 255]));
    const huge = await connect();
    huge.send(`bind-with-token ${'x'.repeat(20_000)}`);
    const unknown = await connect();
    unknown.send('subscribe everything');
    const badJson = await connect();
    badJson.send('{"type": "bind-with-token", ');
    const flood = await connect();
    for (let i = 0; i < 200; i++) flood.send('unbind');

    expect((await binary.waitForClose()).code).toBe(1003);
    expect((await huge.waitForClose()).code).toBe(1009);
    // Counted, not logged at info (any client can send one).
    await waitForMetric(broker, 'broker_websocket_closed_total{reason="protocol-error"}', (v) => v >= 1);
    expect(broker.logs.filter((l) => l.msg === 'websocket error')).toEqual([]);
    expect(await unknown.waitForClose()).toEqual({ code: 1008, reason: 'unknown command "subscribe"' });
    expect(await badJson.waitForClose()).toEqual({ code: 1008, reason: 'malformed JSON' });
    expect((await flood.waitForClose()).code).toBe(4002);

    await stillServed(healthy, id, 'survivor');
  });

  it('disconnects a slow consumer instead of buffering without bound', async () => {
    const id = await create(wsSubscription('patient-change', { filters: ['Patient?_id=slow'] }));
    const slow = await connect();
    slow.send(`bind-with-token ${await token(id)}`);
    await slow.waitFor(() => handshakesOf(slow).length === 1, 'handshake');
    slow.socket.pause();
    const batch = (n: number) =>
      Array.from({ length: 1000 }, (_, i) => eventLike('healthlake-update-patient', `slow-${n}-${i}`, 'slow'));
    for (let n = 0; n < 8 && slow.closed === undefined; n++) {
      expect((await alice.postEvents(batch(n), INGEST_TOKEN)).status).toBe(202);
      const log = await broker
        .waitForLog((r) => r.msg === 'websocket slow consumer closed', 'slow consumer', 2000)
        .catch(() => undefined);
      if (log !== undefined) break;
    }
    slow.socket.resume();
    expect((await slow.waitForClose()).code).toBe(4001);
  });
});

describe('binding tokens of a revoked API client', () => {
  it('refuses a token whose client was removed from BROKER_API_KEYS, as it refuses an unknown subscription', async () => {
    const dataDir = newDataDir();
    let broker = await startBroker({ BROKER_WS_TOKEN_SECRET: WS_SECRET }, dataDir);
    const wsUrl = () => `${broker.url.replace('http', 'ws')}/ws`;
    const sockets: WsClient[] = [];
    try {
      const alice = new Client(broker.url, API_KEYS.alice);
      const id = (await alice.create(wsSubscription('patient-change'))).id as string;
      const res = await alice.call('GET', `/fhir/Subscription/${id}/$get-ws-binding-token`);
      const token = ((res.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString as string;
      const before = await WsClient.connect(wsUrl());
      sockets.push(before);
      before.send(`bind-with-token ${token}`);
      await before.waitFor(() => before.bundles.length === 1, 'the handshake while alice is a client');
      await broker.kill('SIGTERM');

      // The operator removes alice and restarts: her token (valid for minutes more) binds nothing.
      broker = await startBroker(
        { BROKER_WS_TOKEN_SECRET: WS_SECRET, BROKER_API_KEYS: `bob:${API_KEYS.bob}` },
        dataDir,
      );
      const after = await WsClient.connect(wsUrl());
      sockets.push(after);
      after.send(`bind-with-token ${token}`);
      const closed = await after.waitForClose();
      expect([closed.code, after.messages]).toEqual([4003, [`error unknown subscription ${id}`]]);
    } finally {
      for (const s of sockets) s.close();
      await broker.kill('SIGTERM');
    }
  });
});

describe('websocket connection cap', () => {
  it('answers 503 to an upgrade past BROKER_WS_MAX_CONNECTIONS, and takes one again once a socket closed', async () => {
    const broker = await startBroker({ BROKER_WS_MAX_CONNECTIONS: '2' });
    const url = `${broker.url.replace('http', 'ws')}/ws`;
    const open: WsClient[] = [];
    try {
      for (let i = 0; i < 2; i++) open.push(await WsClient.connect(url));
      await expect(WsClient.connect(url)).rejects.toThrow('upgrade refused: 503');
      open.shift()?.close();
      await new Promise((resolve) => setTimeout(resolve, 200));
      open.push(await WsClient.connect(url));
    } finally {
      for (const c of open) c.close();
      await broker.kill('SIGTERM');
    }
  });
});

// A binding token binds any number of sockets: one client must not take them all.
describe.each([
  ['in-process hub', '0'],
  ['2 socket processes', '2'],
])('websocket sockets per API client (%s)', (_mode, wsProcesses) => {
  it('refuses a bind past BROKER_WS_MAX_PER_CLIENT for that client only, and takes one again once a socket closed', async () => {
    const capped = await startBroker({
      BROKER_WS_TOKEN_SECRET: WS_SECRET,
      BROKER_WS_PROCESSES: wsProcesses,
      BROKER_WS_MAX_PER_CLIENT: '2',
    });
    const url = `${capped.url.replace('http', 'ws')}/ws`;
    const open: WsClient[] = [];
    const ofClient = async (client: Client) => {
      const created = await client.create(wsSubscription('patient-change'));
      const id = created.id as string;
      await capped.waitForStatus(id, 'active');
      const res = await client.call('GET', `/fhir/Subscription/${id}/$get-ws-binding-token`);
      return { id, token: ((res.body.parameter as Json[]).find((p) => p.name === 'token') as Json).valueString };
    };
    const bound = async (token: unknown) => {
      const c = await WsClient.connect(url);
      open.push(c);
      c.send(`bind-with-token ${String(token)}`);
      await c.waitFor(
        () => c.bundles.some((b) => statusOf(b).params.get('type')?.valueCode === 'handshake'),
        'the handshake',
      );
      return c;
    };
    try {
      const mine = await ofClient(new Client(capped.url, API_KEYS.alice));
      // One token binds any number of sockets: two, then the client's cap.
      await bound(mine.token);
      await bound(mine.token);
      const third = await WsClient.connect(url);
      open.push(third);
      third.send(`bind-with-token ${mine.token}`);
      expect((await third.waitForClose()).code).toBe(4003);
      expect(third.messages).toEqual([
        'error too many open sockets for this API client (at most 2); close some and bind again',
      ]);
      // Also by the classic R4 bind.
      const r4 = await WsClient.connect(url, { authorization: `Bearer ${API_KEYS.alice}` });
      open.push(r4);
      r4.send(`bind ${mine.id}`);
      expect((await r4.waitForClose()).code).toBe(4003);
      // Another client is not held back by alice's sockets.
      await bound((await ofClient(new Client(capped.url, API_KEYS.bob))).token);
      // A socket that closes makes room.
      open.shift()?.close();
      await new Promise((resolve) => setTimeout(resolve, 200));
      await bound(mine.token);
    } finally {
      for (const c of open) c.close();
      await capped.kill('SIGTERM');
    }
  });
});
