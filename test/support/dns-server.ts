import { createSocket, type Socket } from 'node:dgram';
import { once } from 'node:events';
import { isIPv4 } from 'node:net';

/**
 * A real DNS server over UDP on 127.0.0.1:0, for names the test gives it: `records` answers A
 * (IPv4) and AAAA (IPv6) queries from its map, a name it does not know is NXDOMAIN, and a name
 * under `hangSuffix` gets no answer at all (a DNS server that does not respond). `queries` lists
 * what was asked, as `<type> <name>`.
 */
export class DnsServer {
  readonly queries: string[] = [];
  readonly #socket: Socket;
  readonly #records: ReadonlyMap<string, readonly string[]>;
  readonly #hangSuffix: string;

  private constructor(records: ReadonlyMap<string, readonly string[]>, hangSuffix: string) {
    this.#records = records;
    this.#hangSuffix = hangSuffix;
    this.#socket = createSocket('udp4');
    this.#socket.on('message', (msg, from) => {
      const answer = this.#answer(msg);
      if (answer !== undefined) this.#socket.send(answer, from.port, from.address);
    });
  }

  static async start(records: Record<string, readonly string[]>, hangSuffix = '.hang.test'): Promise<DnsServer> {
    const server = new DnsServer(new Map(Object.entries(records)), hangSuffix);
    server.#socket.bind(0, '127.0.0.1');
    await once(server.#socket, 'listening');
    return server;
  }

  get address(): string {
    return `127.0.0.1:${this.#socket.address().port}`;
  }

  close(): void {
    this.#socket.close();
  }

  #answer(query: Buffer): Buffer | undefined {
    // Header (12 bytes), then one question: labels, type, class.
    let at = 12;
    const labels: string[] = [];
    for (let len = query[at] ?? 0; len > 0; len = query[at] ?? 0) {
      labels.push(query.subarray(at + 1, at + 1 + len).toString('latin1'));
      at += len + 1;
    }
    const questionEnd = at + 5;
    const type = query.readUInt16BE(at + 1);
    const name = labels.join('.').toLowerCase();
    this.queries.push(`${type === 1 ? 'A' : type === 28 ? 'AAAA' : type} ${name}`);
    if (name.endsWith(this.#hangSuffix)) return undefined;
    const known = this.#records.get(name);
    const addresses = (known ?? []).filter((a) => (type === 1 ? isIPv4(a) : type === 28 && !isIPv4(a)));
    const header = Buffer.alloc(12);
    header.writeUInt16BE(query.readUInt16BE(0), 0); // id
    // Response, recursion desired and available; NXDOMAIN (3) for a name it does not know.
    header.writeUInt16BE(0x8180 | (known === undefined ? 3 : 0), 2);
    header.writeUInt16BE(1, 4); // one question
    header.writeUInt16BE(addresses.length, 6);
    const answers = addresses.map((a) => {
      const rdata = type === 1 ? Buffer.from(a.split('.').map(Number)) : ipv6Bytes(a);
      const rr = Buffer.alloc(12);
      rr.writeUInt16BE(0xc00c, 0); // the question's name
      rr.writeUInt16BE(type, 2);
      rr.writeUInt16BE(1, 4); // IN
      rr.writeUInt32BE(60, 6); // TTL
      rr.writeUInt16BE(rdata.length, 10);
      return Buffer.concat([rr, rdata]);
    });
    return Buffer.concat([header, query.subarray(12, questionEnd), ...answers]);
  }
}

function ipv6Bytes(address: string): Buffer {
  const [head = '', tail = ''] = address.split('::');
  const groups = (s: string) => (s === '' ? [] : s.split(':'));
  const h = groups(head);
  const t = groups(tail);
  const all = address.includes('::') ? [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t] : h;
  const out = Buffer.alloc(16);
  all.forEach((g, i) => {
    out.writeUInt16BE(Number.parseInt(g, 16), i * 2);
  });
  return out;
}
