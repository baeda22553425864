import { describe, expect, it } from 'vitest';
import { BrokerError } from '../core/errors.js';
import { checkJsonRequest, parseJsonBody } from './body.js';

function refusal(run: () => unknown): [number, string, string] | 'accepted' {
  try {
    run();
  } catch (err) {
    if (!(err instanceof BrokerError)) throw err;
    return [err.status, err.code, err.message];
  }
  return 'accepted';
}

describe('checkJsonRequest', () => {
  it.each([
    'application/fhir+json',
    'application/json; charset=utf-8',
    'application/fhir+json; charset=UTF-8',
    'application/fhir+json; charset="utf8"',
    'application/fhir+json; fhirVersion=4.0',
    'application/fhir+json; fhirVersion=4.0.1; charset=utf-8',
  ])('takes %s', (type) => {
    expect(refusal(() => checkJsonRequest(type, '10', 100))).toBe('accepted');
  });

  it.each<[string, string]>([
    [
      'application/fhir+json; charset=iso-8859-1',
      'Content-Type charset iso-8859-1 is not accepted; send UTF-8 (charset=utf-8, or no charset)',
    ],
    [
      'application/json; charset=utf-16',
      'Content-Type charset utf-16 is not accepted; send UTF-8 (charset=utf-8, or no charset)',
    ],
    [
      'application/fhir+json; fhirVersion=5.0',
      'Content-Type fhirVersion=5.0 is not accepted: the broker speaks FHIR 4.0 (R4); send fhirVersion=4.0 or none',
    ],
    [
      'application/fhir+json;fhirVersion="3.0"',
      'Content-Type fhirVersion=3.0 is not accepted: the broker speaks FHIR 4.0 (R4); send fhirVersion=4.0 or none',
    ],
  ])('refuses %s with 415 before a byte is read', (type, message) => {
    expect(refusal(() => checkJsonRequest(type, '10', 100))).toEqual([415, 'UNSUPPORTED_MEDIA_TYPE', message]);
  });
});

describe('parseJsonBody', () => {
  it('reads UTF-8, multi-byte characters included', () => {
    expect(parseJsonBody(Buffer.from('{"reason":"Überwachung ✓ 𝄞"}'))).toEqual({ reason: 'Überwachung ✓ 𝄞' });
  });

  it.each<[string, Buffer]>([
    ['Latin-1', Buffer.from('{"reason":"\xdcberwachung"}', 'latin1')],
    ['a lone continuation byte', Buffer.from([0x5b, 0x22, 0x80, 0x22, 0x5d])],
    ['a truncated sequence', Buffer.from([0x5b, 0x22, 0xe2, 0x9c, 0x22, 0x5d])],
    ['an overlong encoding', Buffer.from([0x5b, 0x22, 0xc0, 0xaf, 0x22, 0x5d])],
  ])('refuses %s with 400 BAD_JSON rather than reading U+FFFD', (_name, bytes) => {
    expect(refusal(() => parseJsonBody(bytes))).toEqual([
      400,
      'BAD_JSON',
      'The body is not valid UTF-8, which JSON sent between systems is',
    ]);
  });

  it('refuses a byte order mark, as it always has, saying so', () => {
    const bom = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('{}')]);
    expect(refusal(() => parseJsonBody(bom))).toEqual([
      400,
      'BAD_JSON',
      'The body starts with a byte order mark (U+FEFF), which JSON must not; send it without',
    ]);
  });
});
