import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

/**
 * A stand-in for the Lambda Node runtime, one function per process (see lambda-container.ts):
 * imports the entry module as Lambda would (its top level builds the broker from the
 * environment: the cold start), then runs the named export for each event the parent sends.
 *
 *   node --import tsx test/support/lambda-runtime.ts <entry> <export>
 */

interface Invocation {
  readonly id: number;
  readonly event: unknown;
}

const [entry, exportName] = process.argv.slice(2);
if (entry === undefined || exportName === undefined || process.send === undefined) {
  throw new TypeError('usage: node --import tsx lambda-runtime.ts <entry> <export>, forked with an IPC channel');
}
const send = process.send.bind(process);
const mod = (await import(pathToFileURL(resolve(entry)).href)) as Record<string, unknown>;
const handler = mod[exportName];
if (typeof handler !== 'function') throw new TypeError(`${entry} exports no function ${exportName}`);

process.on('message', (message: Invocation) => {
  // Lambda's context object; the handlers read nothing from it.
  Promise.resolve(handler(message.event, {})).then(
    (result: unknown) => send({ id: message.id, result }),
    (err: unknown) => send({ id: message.id, error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
  );
});
send({ ready: true });
