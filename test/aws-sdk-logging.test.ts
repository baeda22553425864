import { once } from 'node:events';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, expect, it } from 'vitest';
import { RefusedEventQueue } from '../src/aws/refused-events.js';
import { sqsClientFor } from '../src/broker.js';
import { loadConfig } from '../src/config.js';
import { BrokerError } from '../src/core/errors.js';
import { createLogger } from '../src/observability/logger.js';
import { DUMMY_CREDENTIALS } from './support/dynamodb-local.js';
import { tempDir } from './support/temp-dirs.js';

/**
 * The AWS SDK logs a failed command with its whole `input`. A refused request is logged "with
 * where and why but never the event itself" (ingest.ts): so the SDK's log lines say which command
 * failed and how, never what it carried. Found by a review (a dead-letter SendMessage that failed
 * logged the start of the refused event).
 */

const saved = { id: process.env.AWS_ACCESS_KEY_ID, key: process.env.AWS_SECRET_ACCESS_KEY };
afterEach(() => {
  for (const [name, value] of [
    ['AWS_ACCESS_KEY_ID', saved.id],
    ['AWS_SECRET_ACCESS_KEY', saved.key],
  ] as const) {
    if (value === undefined) delete process.env[name];
    else process.env[name] = value;
  }
});

it('a failed dead-letter send logs the command and the failure, not the refused event it carried', async () => {
  // An SQS endpoint that fails every request (500, InternalError).
  const sqs = createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(500, { 'content-type': 'application/x-amz-json-1.0' });
      res.end(
        JSON.stringify({ __type: 'com.amazonaws.sqs#InternalError', message: 'We encountered an internal error.' }),
      );
    });
  });
  sqs.listen(0, '127.0.0.1');
  await once(sqs, 'listening');
  process.env.AWS_ACCESS_KEY_ID = DUMMY_CREDENTIALS.accessKeyId;
  process.env.AWS_SECRET_ACCESS_KEY = DUMMY_CREDENTIALS.secretAccessKey;
  const lines: string[] = [];
  const logger = createLogger('debug', (line) => lines.push(line));
  const queueUrl = 'https://sqs.us-east-1.amazonaws.com/123456789012/dlq';
  const config = {
    ...loadConfig({ BROKER_DATA_DIR: tempDir('fsb-sdklog-') }),
    sqsEndpoint: `http://127.0.0.1:${(sqs.address() as AddressInfo).port}`,
  };
  const client = sqsClientFor(config, queueUrl, 5000, logger);
  // A refused request (no EventBridge event): the sender's own shape, a resource id in it.
  const event = [{ resourceId: 'Patient/jane-doe-1970', id: 7 }];
  try {
    await expect(
      new RefusedEventQueue(client, queueUrl).put(
        event,
        new BrokerError('INVALID_EVENT', 'event [0]: /id must be string'),
        {},
        new Date(),
      ),
    ).rejects.toThrow();
  } finally {
    client.destroy();
    sqs.close();
  }
  const sdkLines = lines.filter((l) => (JSON.parse(l) as { msg: string }).msg === 'aws sdk');
  expect(sdkLines.length).toBeGreaterThan(0);
  expect(sdkLines.join('\n')).toContain('SQSClient SendMessageCommand InternalError');
  expect(lines.join('\n')).not.toContain('jane-doe-1970');
  expect(lines.join('\n')).not.toContain('MessageBody');
});

it('says what failed in every shape the SDK logs, never the input', () => {
  const lines: string[] = [];
  const logger = createLogger('debug', (line) => lines.push(line));
  const config = loadConfig({ BROKER_DATA_DIR: tempDir('fsb-sdkshape-') });
  const client = sqsClientFor(config, 'https://sqs.us-east-1.amazonaws.com/123456789012/dlq', 5000, logger);
  const sdk = client.config.logger as { warn(...a: unknown[]): void; error(...a: unknown[]): void };
  try {
    // @aws-sdk/middleware-sdk-sqs: `logger.warn(e)` (a queue URL that is no URL).
    sdk.warn(new TypeError('Invalid URL'));
    // @smithy/credential-provider-imds: `logger.warn("Credential renew failed: ", e)`.
    sdk.warn('Credential renew failed: ', new Error('connect ECONNREFUSED 169.254.169.254:80'));
    // The logger middleware, with something thrown that is no Error instance.
    sdk.error({
      clientName: 'SQSClient',
      commandName: 'SendMessageCommand',
      input: { MessageBody: 'a refused event' },
      error: { name: 'X', message: 'refused' },
    });
  } finally {
    client.destroy();
  }
  expect(lines.map((l) => (JSON.parse(l) as { message: string }).message)).toEqual([
    'TypeError: Invalid URL',
    'Credential renew failed:  Error: connect ECONNREFUSED 169.254.169.254:80',
    'SQSClient SendMessageCommand X: refused',
  ]);
  expect(lines.join('\n')).not.toContain('a refused event');
});
