import type { BrokerOverrides } from '../../src/broker.js';
import { FhirServer } from './fhir-server.js';
import { inProcessBroker, type TestBroker } from './in-process.js';
import { Receiver } from './receiver.js';

/**
 * An in-process broker that reads resources from a FHIR server double (`BROKER_FHIR_READ`, with
 * `token` as its bearer token when given), and a receiver for its webhooks; closed by `cleanups`
 * (in reverse), the FHIR server too unless the test passed its own (`fhir`, which outlives a
 * restart).
 */
export async function readingBroker(
  cleanups: (() => Promise<void>)[],
  env: Record<string, string>,
  options: { token?: string; fhir?: FhirServer; overrides?: BrokerOverrides } = {},
): Promise<{ t: TestBroker; fhir: FhirServer; receiver: Receiver }> {
  const fhir = options.fhir ?? (await FhirServer.start());
  if (options.token !== undefined) fhir.token = options.token;
  const receiver = await Receiver.start();
  const t = await inProcessBroker(
    {
      BROKER_FHIR_READ: fhir.url,
      ...(options.token === undefined ? {} : { BROKER_FHIR_READ_TOKEN: options.token }),
      ...env,
    },
    options.overrides,
  );
  cleanups.push(
    ...(options.fhir === undefined ? [() => fhir.close()] : []),
    () => receiver.close(),
    () => t.broker.close(0),
  );
  return { t, fhir, receiver };
}
