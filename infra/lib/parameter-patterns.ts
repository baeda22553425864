/**
 * AllowedPatterns of the stack's parameters that become broker variables, so that a value the
 * broker would refuse fails the deploy instead of stopping every function at start. Java regular
 * expressions (CloudFormation's), written within what JavaScript reads the same way: the tests
 * check each against `loadConfig` on a corpus of right and wrong values.
 */

/** 0 to 65535, no leading zero. */
const PORT = '(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)';
const OCTET = '(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])';
/** A dotted quad as a URL writes it (no leading zeros). */
const IPV4 = `${OCTET}(?:\\.${OCTET}){3}`;
/**
 * A lower-case host name whose last label is no number (a URL reads a host ending in a number as an
 * IPv4 address, and refuses it unless it is one), optionally with a trailing dot.
 */
const DOMAIN = '(?:[a-z0-9_-]+\\.)*(?!0x[0-9a-f]*(?![a-z0-9_-]))[a-z0-9_-]*[a-z_-][a-z0-9_-]*\\.?';
/** DOMAIN in any case: a URL lower-cases the host, and BROKER_FHIR_READ is kept as the URL writes it. */
const ANY_CASE_DOMAIN =
  '(?:[A-Za-z0-9_-]+\\.)*(?!0[xX][0-9a-fA-F]*(?![A-Za-z0-9_-]))[A-Za-z0-9_-]*[A-Za-z_-][A-Za-z0-9_-]*\\.?';
/** Of IPv6 addresses only the loopback, as a URL writes it (other spellings are rewritten, or refused). */
const IPV6 = '\\[::1\\]';
const HOST = `(?:${IPV4}|${DOMAIN}|${IPV6})`;

/**
 * A browser origin as a URL serializes it, which is what BROKER_CORS_ORIGINS takes: scheme and
 * host in lower case, no default port (`:443` on https, `:80` on http), no path.
 */
const ORIGIN = `(?:https://${HOST}(?::(?!443(?![0-9]))${PORT})?|http://${HOST}(?::(?!80(?![0-9]))${PORT})?)`;

/** BROKER_CORS_ORIGINS: origins, comma-separated (empty entries are dropped), or `*` alone. */
export const CORS_ORIGINS_PATTERN = `^(?:[\\s,]*\\*[\\s,]*|[\\s,]*(?:${ORIGIN}[\\s,]*(?:,[\\s,]*${ORIGIN}[\\s,]*)*)?)$`;

/**
 * BROKER_FHIR_READ: `healthlake`, or an http(s) FHIR base URL without credentials, query or
 * fragment, whose host is a name, a dotted quad or a bracketed IPv6 address (with a port, a
 * number) and not HealthLake's: only `healthlake` grants the functions the read (the host's case
 * spelled out, and no %-escapes in it, so no spelling slips by).
 */
export const FHIR_READ_PATTERN =
  '^(healthlake|https?://(?![^/]*[aA][mM][aA][zZ][oO][nN][aA][wW][sS]\\.[cC][oO][mM])' +
  `(?:${IPV4}|${ANY_CASE_DOMAIN}|${IPV6})(?::0*${PORT}?)?(/[^\\s?#]*)?)?$`;
