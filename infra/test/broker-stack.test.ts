import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { App } from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';
import { beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config.js';
import { TTL_ATTRIBUTE, tableDefinitions, tableNames } from '../../src/store/dynamodb/tables.js';
import { grantedAccess, targetsOf, unaccountedGrants } from '../../test/support/aws-permissions.js';
import { ACCOUNT, allows, REGION, StackIam, type TemplateJson } from '../../test/support/stack-iam.js';
import { SKIP_BUNDLING_CONTEXT } from '../lib/broker-function.js';
import { BrokerStack, type BrokerStackProps, EVENT_RETENTION } from '../lib/broker-stack.js';
import { FUNCTION_ACCESS, type FunctionName } from '../lib/function-access.js';
import { FUNCTION_ENTRIES } from '../lib/functions.js';
import { RECONCILE_EVERY_MINUTES } from '../lib/reconcile.js';

type Json = unknown;
type JsonObject = Record<string, Json>;
type Resource = { Type: string; Properties: JsonObject; Condition?: string; [key: string]: Json };

/** Synthesised into a temporary directory of its own, removed once the template is read (CDK leaves its default one). */
function synth(props: BrokerStackProps = {}): Template {
  const outdir = mkdtempSync(join(tmpdir(), 'broker-synth-'));
  try {
    const app = new App({ outdir, context: { [SKIP_BUNDLING_CONTEXT]: true } });
    return Template.fromStack(new BrokerStack(app, 'Broker', props));
  } finally {
    rmSync(outdir, { recursive: true, force: true });
  }
}

/** The one resource of `type` whose properties match `props`, with its logical id. */
function only(template: Template, type: string, props: JsonObject = {}): { id: string; resource: Resource } {
  const found = Object.entries(template.findResources(type, { Properties: props }));
  expect(found, `${type} matching ${JSON.stringify(props)}`).toHaveLength(1);
  const [id, resource] = found[0] as [string, Resource];
  return { id, resource };
}

function resources(template: Template, type?: string): [string, Resource][] {
  const all = (template.toJSON() as { Resources: Record<string, Resource> }).Resources;
  return Object.entries(all).filter(([, r]) => type === undefined || r.Type === type);
}

/**
 * Evaluates what CloudFormation would: parameter Refs (defaults, then `overrides`), conditions,
 * Fn::If, Fn::Equals, Fn::Not, Fn::And, Fn::Or, and Fn::Join of what resolved to strings.
 * Everything else is returned as it is.
 */
function evaluate(template: Template, value: Json, overrides: Record<string, string>): Json {
  const json = template.toJSON() as {
    Parameters: Record<string, { Default?: string | number }>;
    Conditions: Record<string, Json>;
  };
  const params: Record<string, Json> = {
    ...Object.fromEntries(Object.entries(json.Parameters).map(([name, p]) => [name, p.Default])),
    ...overrides,
  };
  const condition = (name: string): boolean => ev(json.Conditions[name]) === true;
  const ev = (v: Json): Json => {
    if (Array.isArray(v)) return v.map(ev);
    if (v === null || typeof v !== 'object') return v;
    const entries = Object.entries(v);
    const [key, arg] = entries[0] ?? [];
    if (entries.length === 1 && Array.isArray(arg)) {
      if (key === 'Fn::If') return ev(condition(arg[0] as string) ? arg[1] : arg[2]);
      if (key === 'Fn::Equals') return ev(arg[0]) === ev(arg[1]);
      if (key === 'Fn::Not') return ev(arg[0]) !== true;
      if (key === 'Fn::And') return arg.every((a) => ev(a) === true);
      if (key === 'Fn::Or') return arg.some((a) => ev(a) === true);
      if (key === 'Fn::Join') {
        const parts = (arg[1] as Json[]).map(ev);
        if (parts.every((p) => typeof p === 'string')) return parts.join(arg[0] as string);
      }
    }
    if (key === 'Condition' && typeof arg === 'string') return condition(arg);
    if (key === 'Ref' && typeof arg === 'string' && params[arg] !== undefined) return String(params[arg]);
    return Object.fromEntries(entries.map(([k, x]) => [k, ev(x)]));
  };
  return ev(value);
}

function statements(template: Template): { where: string; statement: JsonObject }[] {
  const out: { where: string; statement: JsonObject }[] = [];
  const add = (where: string, doc: Json) => {
    for (const s of (doc as { Statement: JsonObject[] }).Statement) out.push({ where, statement: s });
  };
  for (const [id, r] of resources(template)) {
    if (r.Type === 'AWS::IAM::Policy' || r.Type === 'AWS::IAM::ManagedPolicy') add(id, r.Properties.PolicyDocument);
    if (r.Type === 'AWS::IAM::Role') {
      for (const p of (r.Properties.Policies ?? []) as JsonObject[]) add(id, p.PolicyDocument);
    }
  }
  return out;
}

const list = (v: Json): Json[] => (Array.isArray(v) ? v : [v]);

/** The logical id of the function `name` in an evaluated template. */
function fnIdOf(iam: StackIam, name: FunctionName): string {
  const { handler, description } = FUNCTION_ENTRIES[name];
  return iam.functionId({ Handler: `index.${handler}`, Description: description });
}

const HEALTHLAKE_PATTERN = {
  source: ['aws.healthlake'],
  'detail-type': ['AWS API Call via CloudTrail'],
  detail: {
    eventName: ['CreateResource', 'UpdateResource', 'PatchResource', 'DeleteResource', 'ProcessBundle'],
    // Failed calls changed nothing.
    errorCode: [{ exists: false }],
  },
};

describe('BrokerStack', () => {
  let template: Template;
  let ids: Record<'events' | 'api' | 'dispatcher' | 'connect' | 'disconnect' | 'message' | 'reconcile', string>;
  let dlq: string;
  let rule: string;

  beforeAll(() => {
    template = synth();
    const fn = (handler: string, description: string) =>
      only(template, 'AWS::Lambda::Function', { Handler: handler, Description: description }).id;
    ids = {
      events: fn('index.handler', 'HealthLake change events'),
      api: fn('index.handler', 'REST API (/fhir, /events, ...)'),
      dispatcher: fn('index.handler', 'Retries, handshakes, heartbeats, purge'),
      connect: fn('index.connect', 'WebSocket $connect'),
      disconnect: fn('index.disconnect', 'WebSocket $disconnect'),
      message: fn('index.message', 'WebSocket messages'),
      reconcile: fn('index.handler', 'Reconciliation: changes whose event never came'),
    };
    dlq = only(template, 'AWS::SQS::Queue').id;
    rule = only(template, 'AWS::Events::Rule', { EventPattern: Match.objectLike({ source: ['aws.healthlake'] }) }).id;
  });

  describe('HealthLake events', () => {
    const pattern = (overrides: Record<string, string>) =>
      evaluate(template, template.toJSON().Resources[rule].Properties.EventPattern, overrides);

    it('matches HealthLake writes from every datastore while HealthLakeDatastoreId is empty', () => {
      expect(pattern({})).toStrictEqual(HEALTHLAKE_PATTERN);
      expect(pattern({ HealthLakeDatastoreId: '' })).toStrictEqual(HEALTHLAKE_PATTERN);
    });

    it('takes only a well-formed datastore id (a typo would match nothing, silently)', () => {
      const parameter = template.toJSON().Parameters.HealthLakeDatastoreId;
      const allowed = new RegExp(parameter.AllowedPattern);
      expect(allowed.test('')).toBe(true);
      expect(allowed.test('0123456789abcdef0123456789abcdef')).toBe(true);
      for (const bad of ['0123456789abcdef0123456789abcde', ' 0123456789abcdef0123456789abcdef', 'datastore-1']) {
        expect(allowed.test(bad)).toBe(false);
      }
    });

    it('takes CorsOrigins only as BROKER_CORS_ORIGINS would (a typo would stop every function at start)', () => {
      const parameter = template.toJSON().Parameters.CorsOrigins;
      expect(parameter.Default).toBe('');
      const allowed = new RegExp(parameter.AllowedPattern);
      for (const good of ['', '*', 'https://app.example.org', 'https://a.example, http://localhost:5173']) {
        expect([good, allowed.test(good)]).toEqual([good, true]);
      }
      for (const bad of ['app.example.org', 'https://app.example.org/', '*, https://a.example', 'https://a b']) {
        expect([bad, allowed.test(bad)]).toEqual([bad, false]);
      }
      // Whatever the pattern lets through, the config takes (so a deploy never stops every function at
      // start), also where a URL would rewrite the value (case, a default port, a port out of range);
      // the pattern may refuse a few odd spellings the config takes (`https://a..b`): the deploy says so.
      const config = (value: string) => {
        try {
          loadConfig({ BROKER_CORS_ORIGINS: value });
          return true;
        } catch {
          return false;
        }
      };
      const usual = [
        ...['', ' ', ',', '*', ' * ', '*,', 'https://a.example,,http://b.example', 'https://a.example, '],
        ...['http://localhost:5173', 'https://app.example.org:8443', 'http://127.0.0.1:8080', 'https://[::1]:3000'],
        ...['https://my_app.example.org', 'https://app.example.org.', 'http://a.example:0', 'https://a.example:65535'],
        ...['https://xn--nxasmq6b.example', 'https://a-b.example', 'http://10.1.2.3'],
      ];
      const refused = [
        ...['https://App.example.org', 'HTTPS://app.example.org', 'https://app.example.org:443', 'http://a.example:80'],
        ...['https://a.example:65536', 'https://a.example:0443', 'https://a.example:', 'https://a.example:x'],
        ...['https://a.example/', 'https://a.example/x', 'https://a.example?x', 'https://a.example#x'],
        ...['https://u@a.example', 'ftp://a.example', 'https://a.example https://b.example', '*, *'],
        ...['https://a.1', 'https://1.2.3', 'http://010.1.2.3', 'https://256.1.1.1', 'https://a.0x1f'],
        ...['https://a%2eexample', 'https://[0:0::1]'],
      ];
      for (const value of usual) expect([value, allowed.test(value), config(value)]).toEqual([value, true, true]);
      for (const value of refused) expect([value, allowed.test(value), config(value)]).toEqual([value, false, false]);
      for (const value of ['https://a..b', 'https://.a', 'https://a!b.c', 'https://[fd00::5]']) {
        expect([value, allowed.test(value) && !config(value)]).toEqual([value, false]);
      }
    });

    it('takes FullResourceClients only as BROKER_FULL_RESOURCE_CLIENTS would, and only with FhirRead', () => {
      const json = template.toJSON();
      const parameter = json.Parameters.FullResourceClients;
      expect(parameter.Default).toBe('');
      const allowed = new RegExp(parameter.AllowedPattern);
      for (const good of ['', '*', 'alice', 'alice, bob.smith,c_3']) {
        expect([good, allowed.test(good)]).toEqual([good, true]);
      }
      for (const bad of ['*, alice', 'al ice', 'alice,', ',alice', 'a'.repeat(65)]) {
        expect([bad, allowed.test(bad)]).toEqual([bad, false]);
      }
      // The pattern and the config agree on both sides.
      const config = (value: string) => () =>
        loadConfig({ BROKER_FHIR_READ: 'healthlake', BROKER_FULL_RESOURCE_CLIENTS: value, AWS_REGION: REGION });
      for (const good of ['*', 'alice', 'alice, bob.smith,c_3']) expect(config(good)).not.toThrow();
      for (const bad of ['al ice', 'a'.repeat(65)]) expect(config(bad)).toThrow(/BROKER_FULL_RESOURCE_CLIENTS/);
      expect(json.Rules.FullResourceReadsAServer).toEqual({
        RuleCondition: { 'Fn::Not': [{ 'Fn::Equals': [{ Ref: 'FullResourceClients' }, ''] }] },
        Assertions: [
          {
            Assert: { 'Fn::Not': [{ 'Fn::Equals': [{ Ref: 'FhirRead' }, ''] }] },
            AssertDescription:
              'FullResourceClients needs FhirRead: healthlake or the FHIR base URL the resources are read from',
          },
        ],
      });
    });

    it('takes FhirRead only as BROKER_FHIR_READ would, and lets the ingesting functions read HealthLake only when it says healthlake', () => {
      const json = template.toJSON();
      const parameter = json.Parameters.FhirRead;
      expect(parameter.Default).toBe('');
      const allowed = new RegExp(parameter.AllowedPattern);
      for (const good of ['', 'healthlake', 'https://fhir.example.org/r4', 'http://10.0.0.5:8080/fhir']) {
        expect([good, allowed.test(good)]).toEqual([good, true]);
      }
      for (const bad of [
        'HealthLake',
        'fhir.example.org',
        'https://fhir.example.org/r4?x=1',
        'https://fhir.example.org/r4#x',
        'https://a b',
        'https://user:pass@fhir.example.org/r4',
        // HealthLake by URL would get SigV4 but no IAM grant: it must be written healthlake.
        'https://healthlake.us-east-1.amazonaws.com/datastore/0123456789abcdef0123456789abcdef/r4',
        'https://HEALTHLAKE.US-EAST-1.AMAZONAWS.COM/datastore/0123456789abcdef0123456789abcdef/r4',
        'https://healthlake.us-east-1.amazonaws%2Ecom/datastore/0123456789abcdef0123456789abcdef/r4',
      ]) {
        expect([bad, allowed.test(bad)]).toEqual([bad, false]);
      }
      // Whatever else the pattern lets through, the config takes; what the config refuses, the
      // pattern does (it may refuse some spellings the config takes: `https:fhir.example.org`).
      const config = (value: string) => {
        try {
          loadConfig({ BROKER_FHIR_READ: value, AWS_REGION: REGION });
          return true;
        } catch {
          return false;
        }
      };
      const usual = [
        ...['healthlake', 'https://fhir.example.org/r4', 'https://FHIR.Example.org/R4', 'http://fhir.internal:0080/'],
        ...[
          'https://fhir.example.org:8443',
          'https://fhir.example.org:/r4',
          'http://[::1]:8080/fhir',
          'https://a.b./r4',
        ],
        ...['https://fhir.example.org/r4/', 'http://10.0.0.5:8080/fhir'],
      ];
      const refused = [
        ...['https://fhir.example.org:abc/r4', 'https://fhir.example.org:65536/r4', 'https://fhir.1/r4'],
        ...['https://fhir example.org/r4', 'https://fh|ir.example.org', 'ftp://fhir.example.org', 'https://'],
        ...[
          'https://[1:2]/r4',
          'https://fhir.0x10/r4',
          'https://fhir.example.org/r4?x',
          'https://fhir.example.org/r4#x',
        ],
      ];
      for (const value of usual) expect([value, allowed.test(value), config(value)]).toEqual([value, true, true]);
      for (const value of refused) expect([value, allowed.test(value), config(value)]).toEqual([value, false, false]);
      for (const value of [
        'HTTPS://fhir.example.org',
        'https:///r4',
        'https://[fd00::5]/r4',
        'https:fhir.example.org/r4',
        'https://1.2.3/r4',
        'https://a..b/r4',
      ]) {
        expect([value, allowed.test(value) && !config(value)]).toEqual([value, false]);
      }
      expect(json.Conditions.FhirReadHealthLake).toEqual({ 'Fn::Equals': [{ Ref: 'FhirRead' }, 'healthlake'] });
      interface PolicyResource {
        Type: string;
        Condition?: string;
        Properties: {
          PolicyDocument: { Statement: { Action: unknown; Resource: unknown }[] };
          Roles: { Ref: string }[];
        };
      }
      const [id, policy] = Object.entries(json.Resources as Record<string, PolicyResource>).find(
        ([, r]) => r.Type === 'AWS::IAM::Policy' && r.Condition === 'FhirReadHealthLake',
      ) as [string, PolicyResource];
      expect(id).toMatch(/^ReadHealthLakeResources/);
      const statements = policy.Properties.PolicyDocument.Statement;
      expect(statements).toHaveLength(1);
      expect(statements[0]?.Action).toEqual(['healthlake:ReadResource', 'healthlake:SearchWithGet']);
      expect(JSON.stringify(statements[0]?.Resource)).toContain('HealthLakeDatastoreIdSet');
      const roles = policy.Properties.Roles.map((r) => r.Ref).sort();
      expect(roles).toHaveLength(2);
      expect(roles.every((r) => /^Functions(Events|Api)ServiceRole/.test(r))).toBe(true);
    });

    it('grants healthlake:ReadResource to the ingesting functions only, only with FhirRead=healthlake, on the fed datastore', () => {
      const json = template.toJSON() as TemplateJson;
      const fnId = (name: FunctionName, iam: StackIam) => {
        const { handler, description } = FUNCTION_ENTRIES[name];
        return iam.functionId({ Handler: `index.${handler}`, Description: description });
      };
      const datastore = '0123456789abcdef0123456789abcdef';
      const arn = (id: string) => `arn:aws:healthlake:${REGION}:${ACCOUNT}:datastore/fhir/${id}`;
      const reads = (iam: StackIam, name: FunctionName, id: string) =>
        allows(iam.statements(fnId(name, iam)), 'healthlake:ReadResource', arn(id));
      const off = new StackIam(json);
      const every = new StackIam(json, { FhirRead: 'healthlake' });
      const one = new StackIam(json, { FhirRead: 'healthlake', HealthLakeDatastoreId: datastore });
      for (const name of Object.keys(FUNCTION_ENTRIES) as FunctionName[]) {
        const ingests = name === 'events' || name === 'api';
        expect([name, reads(off, name, datastore)]).toEqual([name, false]);
        expect([name, reads(every, name, datastore), reads(every, name, 'fedcba98765432100123456789abcdef')]).toEqual([
          name,
          ingests,
          ingests,
        ]);
        expect([name, reads(one, name, datastore), reads(one, name, 'fedcba98765432100123456789abcdef')]).toEqual([
          name,
          ingests,
          false,
        ]);
      }
    });

    it('keeps the dead-letter queue when the stack is deleted or the queue replaced', () => {
      const queue = template.toJSON().Resources[dlq];
      expect([queue.DeletionPolicy, queue.UpdateReplacePolicy]).toEqual(['Retain', 'Retain']);
    });

    it('throttles both APIs at their stage, before Lambda', () => {
      template.hasResourceProperties('AWS::ApiGatewayV2::Stage', {
        StageName: '$default',
        DefaultRouteSettings: { ThrottlingRateLimit: 1_000, ThrottlingBurstLimit: 2_000 },
      });
      template.hasResourceProperties('AWS::ApiGatewayV2::Stage', {
        StageName: 'prod',
        DefaultRouteSettings: Match.objectLike({ ThrottlingRateLimit: 500, ThrottlingBurstLimit: 1_000 }),
      });
    });

    it('matches only the named datastore when HealthLakeDatastoreId is set', () => {
      expect(pattern({ HealthLakeDatastoreId: '0123456789abcdef0123456789abcdef' })).toStrictEqual({
        ...HEALTHLAKE_PATTERN,
        detail: {
          ...HEALTHLAKE_PATTERN.detail,
          requestParameters: { datastoreId: ['0123456789abcdef0123456789abcdef'] },
        },
      });
    });

    it('listens on the default bus and targets the events function with 24 h of retries and a DLQ', () => {
      const props = template.toJSON().Resources[rule].Properties;
      expect(props.EventBusName).toBeUndefined();
      expect(props.Targets).toStrictEqual([
        {
          Id: 'Target0',
          Arn: { 'Fn::GetAtt': [ids.events, 'Arn'] },
          DeadLetterConfig: { Arn: { 'Fn::GetAtt': [dlq, 'Arn'] } },
          RetryPolicy: { MaximumRetryAttempts: 185, MaximumEventAgeInSeconds: 86_400 },
        },
      ]);
      template.hasResourceProperties('AWS::Lambda::Permission', {
        Action: 'lambda:InvokeFunction',
        FunctionName: { 'Fn::GetAtt': [ids.events, 'Arn'] },
        Principal: 'events.amazonaws.com',
        SourceArn: { 'Fn::GetAtt': [rule, 'Arn'] },
      });
    });

    it('keeps a dead-letter queue that is encrypted, TLS-only, holds 6 days and admits only the rule', () => {
      template.hasResourceProperties('AWS::SQS::Queue', {
        SqsManagedSseEnabled: true,
        MessageRetentionPeriod: 6 * 86_400,
      });
      template.hasResourceProperties('AWS::SQS::QueuePolicy', {
        Queues: [{ Ref: dlq }],
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
            Match.objectLike({
              Effect: 'Allow',
              Action: 'sqs:SendMessage',
              Principal: { Service: 'events.amazonaws.com' },
              Condition: { ArnEquals: { 'aws:SourceArn': { 'Fn::GetAtt': [rule, 'Arn'] } } },
            }),
          ]),
        },
      });
    });

    it('drops dead letters a day before their event ids expire, so a replay from the queue is never delivered twice', () => {
      const retention = template.toJSON().Resources[dlq].Properties.MessageRetentionPeriod as number;
      // What every function is given as BROKER_EVENT_RETENTION (the dedupe ids' lifetime).
      const eventRetention = new Set(
        Object.values(ids).map(
          (id) => template.toJSON().Resources[id].Properties.Environment.Variables.BROKER_EVENT_RETENTION as string,
        ),
      );
      expect([...eventRetention]).toStrictEqual([`${EVENT_RETENTION.toDays()}d`]);
      const eventRetentionSeconds = EVENT_RETENTION.toSeconds();
      // A failure record reaches the queue up to 6 h (Lambda's maximum event age) after its id was stored.
      expect(retention + 6 * 3600).toBeLessThan(eventRetentionSeconds);
      expect(retention).toBe(eventRetentionSeconds - 86_400);
    });

    it('sends events the function fails on to the same dead-letter queue', () => {
      template.hasResourceProperties('AWS::Lambda::EventInvokeConfig', {
        FunctionName: { Ref: ids.events },
        MaximumRetryAttempts: 2,
        MaximumEventAgeInSeconds: 21_600,
        DestinationConfig: { OnFailure: { Destination: { 'Fn::GetAtt': [dlq, 'Arn'] } } },
      });
    });
  });

  describe('tables', () => {
    const definitions = tableDefinitions('fhir-broker-');

    it('creates exactly the tables the DynamoDB store defines, with their keys and indexes', () => {
      const tables = resources(template, 'AWS::DynamoDB::Table').map(([, r]) => r.Properties as JsonObject);
      expect(tables.map((t) => t.TableName).sort()).toStrictEqual([
        'fhir-broker-connections',
        'fhir-broker-event-ids',
        'fhir-broker-notifications',
        'fhir-broker-subscription-types',
        'fhir-broker-subscriptions',
      ]);
      for (const { input } of definitions) {
        const table = tables.find((t) => t.TableName === input.TableName) ?? {};
        const byName = (a: { AttributeName?: string }, b: { AttributeName?: string }) =>
          String(a.AttributeName).localeCompare(String(b.AttributeName));
        expect(table.KeySchema, input.TableName).toStrictEqual(input.KeySchema);
        expect([...(table.AttributeDefinitions as [])].sort(byName), input.TableName).toStrictEqual(
          [...(input.AttributeDefinitions ?? [])].sort(byName),
        );
        expect(table.GlobalSecondaryIndexes, input.TableName).toStrictEqual(
          input.GlobalSecondaryIndexes?.map((g) => ({
            IndexName: g.IndexName,
            KeySchema: g.KeySchema,
            Projection: { ProjectionType: 'ALL' },
          })),
        );
      }
    });

    it('keys subscriptions by id, notifications by subscription and number, event ids by id and scope, the type index by type and subscription', () => {
      const keys = (name: string) =>
        only(template, 'AWS::DynamoDB::Table', { TableName: `fhir-broker-${name}` }).resource.Properties.KeySchema;
      expect(keys('subscriptions')).toStrictEqual([{ AttributeName: 'id', KeyType: 'HASH' }]);
      expect(keys('notifications')).toStrictEqual([
        { AttributeName: 'subscriptionId', KeyType: 'HASH' },
        { AttributeName: 'eventNumber', KeyType: 'RANGE' },
      ]);
      expect(keys('event-ids')).toStrictEqual([
        { AttributeName: 'eventId', KeyType: 'HASH' },
        { AttributeName: 'scope', KeyType: 'RANGE' },
      ]);
      expect(keys('connections')).toEqual(expect.arrayContaining([{ AttributeName: 'connectionId', KeyType: 'HASH' }]));
      expect(keys('subscription-types')).toStrictEqual([
        { AttributeName: 'resourceType', KeyType: 'HASH' },
        { AttributeName: 'subscriptionId', KeyType: 'RANGE' },
      ]);
    });

    it.each(definitions.map((d) => [d.input.TableName, d.ttl] as const))(
      '%s is on demand, recoverable, encrypted with the AWS managed key, retained and protected from deletion (TTL: %s)',
      (name, ttl) => {
        const { resource } = only(template, 'AWS::DynamoDB::Table', { TableName: name });
        expect(resource.DeletionPolicy).toBe('Retain');
        expect(resource.UpdateReplacePolicy).toBe('Retain');
        expect(resource.Properties).toMatchObject({
          DeletionProtectionEnabled: true,
          BillingMode: 'PAY_PER_REQUEST',
          PointInTimeRecoverySpecification: { PointInTimeRecoveryEnabled: true },
          SSESpecification: { SSEEnabled: true },
        });
        expect(resource.Properties.TimeToLiveSpecification).toStrictEqual(
          ttl ? { AttributeName: TTL_ATTRIBUTE, Enabled: true } : undefined,
        );
      },
    );

    it('names tables, the bus and BROKER_TABLE_PREFIX after the tablePrefix prop', () => {
      const staged = synth({ tablePrefix: 'staging-broker-' });
      staged.hasResourceProperties('AWS::DynamoDB::Table', { TableName: 'staging-broker-subscriptions' });
      staged.hasResourceProperties('AWS::Events::EventBus', { Name: 'staging-broker-events' });
      staged.hasResourceProperties('AWS::Lambda::Function', {
        Environment: { Variables: Match.objectLike({ BROKER_TABLE_PREFIX: 'staging-broker-' }) },
      });
    });
  });

  describe('APIs', () => {
    it('routes every HTTP request to the API function ($default, payload 2.0) on an auto-deployed stage', () => {
      const api = only(template, 'AWS::ApiGatewayV2::Api', { ProtocolType: 'HTTP' }).id;
      const integration = only(template, 'AWS::ApiGatewayV2::Integration', {
        ApiId: { Ref: api },
        IntegrationType: 'AWS_PROXY',
        IntegrationUri: { 'Fn::GetAtt': [ids.api, 'Arn'] },
        PayloadFormatVersion: '2.0',
      }).id;
      expect(template.findResources('AWS::ApiGatewayV2::Route', { Properties: { ApiId: { Ref: api } } })).toStrictEqual(
        {
          [only(template, 'AWS::ApiGatewayV2::Route', { ApiId: { Ref: api } }).id]: expect.objectContaining({
            Properties: {
              ApiId: { Ref: api },
              AuthorizationType: 'NONE',
              RouteKey: '$default',
              Target: { 'Fn::Join': ['', ['integrations/', { Ref: integration }]] },
            },
          }),
        },
      );
      template.hasResourceProperties('AWS::ApiGatewayV2::Stage', {
        ApiId: { Ref: api },
        StageName: '$default',
        AutoDeploy: true,
      });
    });

    it('routes $connect, $disconnect and $default WebSocket frames to their functions on the prod stage', () => {
      const api = only(template, 'AWS::ApiGatewayV2::Api', { ProtocolType: 'WEBSOCKET' }).id;
      const routes = resources(template, 'AWS::ApiGatewayV2::Route').filter(
        ([, r]) => (r.Properties.ApiId as { Ref: string }).Ref === api,
      );
      const byKey = Object.fromEntries(
        routes.map(([, r]) => {
          const integrationId = (r.Properties.Target as { 'Fn::Join': [string, [string, { Ref: string }]] })[
            'Fn::Join'
          ][1][1].Ref;
          const uri = JSON.stringify(template.toJSON().Resources[integrationId].Properties.IntegrationUri);
          const fn = Object.entries(ids).find(([, id]) => uri.includes(`"${id}"`))?.[0];
          return [r.Properties.RouteKey, fn];
        }),
      );
      expect(byKey).toStrictEqual({ $connect: 'connect', $disconnect: 'disconnect', $default: 'message' });
      template.hasResourceProperties('AWS::ApiGatewayV2::Stage', {
        ApiId: { Ref: api },
        StageName: 'prod',
        AutoDeploy: true,
      });
      for (const fn of [ids.connect, ids.disconnect, ids.message]) {
        template.hasResourceProperties('AWS::Lambda::Permission', {
          FunctionName: { 'Fn::GetAtt': [fn, 'Arn'] },
          Principal: 'apigateway.amazonaws.com',
        });
      }
    });
  });

  describe('functions', () => {
    it.each(['events', 'api', 'dispatcher', 'connect', 'disconnect', 'message'] as const)(
      'the %s function runs Node 20 on arm64 with the whole broker environment',
      (name) => {
        const httpApi = only(template, 'AWS::ApiGatewayV2::Api', { ProtocolType: 'HTTP' }).id;
        const wsApi = only(template, 'AWS::ApiGatewayV2::Api', { ProtocolType: 'WEBSOCKET' }).id;
        const bus = only(template, 'AWS::Events::EventBus', { Name: 'fhir-broker-events' }).id;
        const secret = only(template, 'AWS::SecretsManager::Secret', { SecretString: Match.anyValue() }).id;
        const wsUrl = (scheme: string) => ({
          'Fn::Join': [
            '',
            [
              `${scheme}://`,
              { Ref: wsApi },
              '.execute-api.',
              { Ref: 'AWS::Region' },
              '.',
              { Ref: 'AWS::URLSuffix' },
              '/prod',
            ],
          ],
        });
        const props = template.toJSON().Resources[ids[name]].Properties;
        expect(props.Runtime).toBe('nodejs22.x');
        expect(props.Architectures).toStrictEqual(['arm64']);
        expect(props.Environment.Variables).toStrictEqual({
          BROKER_STORE: 'dynamodb',
          BROKER_TABLE_PREFIX: 'fhir-broker-',
          BROKER_PUBLIC_URL: { 'Fn::GetAtt': [httpApi, 'ApiEndpoint'] },
          BROKER_WEBSOCKET_URL: wsUrl('wss'),
          BROKER_WS_MANAGEMENT_ENDPOINT: wsUrl('https'),
          BROKER_EVENT_BUS: { Ref: bus },
          BROKER_SECRET_ARN: { Ref: secret },
          BROKER_EVENT_RETENTION: '7d',
          BROKER_TOPICS_DIR: '/var/task/subscriptions/topics',
          BROKER_MAX_INGEST_BYTES: '5000000',
          BROKER_CORS_ORIGINS: { Ref: 'CorsOrigins' },
          BROKER_FHIR_READ: { Ref: 'FhirRead' },
          BROKER_FULL_RESOURCE_CLIENTS: { Ref: 'FullResourceClients' },
          NODE_OPTIONS: '--enable-source-maps',
          // The events function puts an event the broker refuses on the dead-letter queue itself.
          ...(name === 'events' ? { BROKER_DEAD_LETTER_QUEUE_URL: { Ref: dlq } } : {}),
        });
      },
    );

    it('runs the dispatcher every minute, without retries (the next tick retries)', () => {
      template.hasResourceProperties('AWS::Events::Rule', {
        ScheduleExpression: 'rate(1 minute)',
        Targets: [
          Match.objectLike({
            Arn: { 'Fn::GetAtt': [ids.dispatcher, 'Arn'] },
            RetryPolicy: { MaximumRetryAttempts: 0 },
          }),
        ],
      });
      // Nor a throttled tick held for hours: dropped after a minute, when the next one is due.
      template.hasResourceProperties('AWS::Lambda::EventInvokeConfig', {
        FunctionName: { Ref: ids.dispatcher },
        MaximumRetryAttempts: 0,
        MaximumEventAgeInSeconds: 60,
      });
    });
  });

  describe('credentials', () => {
    it('composes the JSON secret from three generated values, with no secret in the template', () => {
      const generators = resources(template, 'AWS::SecretsManager::Secret').filter(
        ([, r]) => r.Properties.GenerateSecretString !== undefined,
      );
      expect(generators.map(([, r]) => r.Properties.GenerateSecretString)).toStrictEqual([
        { ExcludePunctuation: true, IncludeSpace: false, PasswordLength: 40 },
        { ExcludePunctuation: true, IncludeSpace: false, PasswordLength: 40 },
        { ExcludePunctuation: true, IncludeSpace: false, PasswordLength: 64 },
      ]);
      const [apiKey, ingest, ws] = generators.map(([id]) => id);
      const secret = only(template, 'AWS::SecretsManager::Secret', { SecretString: Match.anyValue() }).resource;
      const parts = (secret.Properties.SecretString as { 'Fn::Join': [string, Json[]] })['Fn::Join'][1];
      // Rebuild the JSON with each reference as <ref:id>, then parse it: the shape the functions read.
      const shape = parts
        .map((p) => (typeof p === 'string' ? p : `<ref:${(p as { Ref: string }).Ref}>`))
        .join('')
        .replaceAll(/\{\{resolve:secretsmanager:(<ref:[^>]+>):SecretString:::\}\}/g, '$1');
      expect(JSON.parse(shape)).toStrictEqual({
        apiKeys: `local:<ref:${apiKey}>`,
        ingestToken: `<ref:${ingest}>`,
        wsTokenSecret: `<ref:${ws}>`,
      });
    });

    it('keeps the credentials when the stack is deleted, as it keeps the tables (the seeds go)', () => {
      const policies = resources(template, 'AWS::SecretsManager::Secret').map(([, r]) => [
        r.Properties.GenerateSecretString === undefined ? 'credentials' : 'seed',
        r.DeletionPolicy,
        r.UpdateReplacePolicy,
      ]);
      expect(policies).toEqual([
        ['seed', 'Delete', 'Delete'],
        ['seed', 'Delete', 'Delete'],
        ['seed', 'Delete', 'Delete'],
        ['credentials', 'Retain', 'Retain'],
      ]);
    });
  });

  describe('IAM', () => {
    it('grants no statement with every action on every resource', () => {
      const all = statements(template);
      expect(all.length).toBeGreaterThan(0);
      const offending = all.filter(
        ({ statement: s }) =>
          s.Effect === 'Allow' &&
          list(s.Action).some((a) => a === '*' || a === '*:*') &&
          list(s.Resource).includes('*'),
      );
      expect(offending).toStrictEqual([]);
    });

    it('grants no service-wide wildcard action (dynamodb:*, sqs:*, …)', () => {
      const wildcards = statements(template).flatMap(({ where, statement }) =>
        list(statement.Action)
          .filter((a) => typeof a === 'string' && a.endsWith('*'))
          .map((a) => `${where}: ${String(a)}`),
      );
      expect(wildcards).toStrictEqual([]);
    });

    it('scopes secrets, bus and WebSocket management to the stack’s own resources', () => {
      const secret = only(template, 'AWS::SecretsManager::Secret', { SecretString: Match.anyValue() }).id;
      const bus = only(template, 'AWS::Events::EventBus').id;
      const wsApi = only(template, 'AWS::ApiGatewayV2::Api', { ProtocolType: 'WEBSOCKET' }).id;
      const resourcesOf = (action: string) => {
        const found = statements(template)
          .filter(({ statement }) => list(statement.Action).includes(action))
          .map(({ statement }) => JSON.stringify(statement.Resource));
        expect(found.length, action).toBeGreaterThan(0);
        return [...new Set(found)];
      };
      expect(resourcesOf('secretsmanager:GetSecretValue')).toStrictEqual([JSON.stringify({ Ref: secret })]);
      expect(resourcesOf('events:PutEvents')).toStrictEqual([JSON.stringify({ 'Fn::GetAtt': [bus, 'Arn'] })]);
      expect(resourcesOf('execute-api:ManageConnections')).toStrictEqual([
        JSON.stringify({
          'Fn::Join': [
            '',
            [
              'arn:',
              { Ref: 'AWS::Partition' },
              ':execute-api:',
              { Ref: 'AWS::Region' },
              ':',
              { Ref: 'AWS::AccountId' },
              ':',
              { Ref: wsApi },
              '/prod/*/@connections/*',
            ],
          ],
        }),
      ]);
    });
  });

  describe('IAM per function', () => {
    const idOf: Record<FunctionName, keyof typeof ids> = {
      events: 'events',
      api: 'api',
      dispatcher: 'dispatcher',
      wsConnect: 'connect',
      wsDisconnect: 'disconnect',
      wsMessage: 'message',
      reconcile: 'reconcile',
    };
    /** The statements of the policies attached to the function's role. */
    const statementsOf = (functionId: string): JsonObject[] => {
      const role = (template.toJSON().Resources[functionId].Properties.Role as { 'Fn::GetAtt': [string] })[
        'Fn::GetAtt'
      ][0];
      return resources(template, 'AWS::IAM::Policy')
        .filter(([, r]) => (r.Properties.Roles as { Ref: string }[]).some((ref) => ref.Ref === role))
        .flatMap(([, r]) => (r.Properties.PolicyDocument as { Statement: JsonObject[] }).Statement);
    };

    // test/aws-iam.test.ts proves these grants against what the handlers do; this pins the synthesis.
    it.each(Object.keys(FUNCTION_ACCESS) as FunctionName[])(
      'grants the %s function item access to exactly the tables function-access.ts names',
      (name) => {
        const roleOfTable = new Map(
          Object.entries(tableNames('fhir-broker-')).map(([role, tableName]) => [
            only(template, 'AWS::DynamoDB::Table', { TableName: tableName }).id,
            role,
          ]),
        );
        const granted: Record<string, Set<string>> = {};
        for (const s of statementsOf(ids[idOf[name]])) {
          const actions = list(s.Action).map(String);
          const dynamodb = actions.filter((a) => a.startsWith('dynamodb:') && a !== 'dynamodb:DescribeTable');
          const kinds = [
            ...(actions.some((a) => ['dynamodb:GetItem', 'dynamodb:Query', 'dynamodb:Scan'].includes(a))
              ? ['read']
              : []),
            ...(dynamodb.length === 1 && dynamodb[0] === 'dynamodb:PutItem'
              ? ['put']
              : actions.some((a) => ['dynamodb:PutItem', 'dynamodb:UpdateItem', 'dynamodb:DeleteItem'].includes(a))
                ? ['write']
                : []),
          ];
          for (const resource of list(s.Resource)) {
            const getAtt = JSON.stringify(resource).match(/"Fn::GetAtt":\["([^"]+)","Arn"\]/)?.[1] ?? '';
            const role = roleOfTable.get(getAtt);
            if (role === undefined) continue;
            granted[role] ??= new Set();
            for (const kind of kinds) granted[role].add(kind);
          }
        }
        // ['read', 'write'] → 'read-write', as function-access.ts spells it.
        const asNamed = Object.fromEntries(Object.entries(granted).map(([role, k]) => [role, [...k].sort().join('-')]));
        expect(asNamed).toStrictEqual(FUNCTION_ACCESS[name].tables);
      },
    );

    it('lets the internet-facing $connect function put connection items and do nothing else with DynamoDB', () => {
      const actions = statementsOf(ids.connect)
        .flatMap((s) => list(s.Action).map(String))
        .filter((a) => a.startsWith('dynamodb:'));
      expect([...new Set(actions)]).toEqual(['dynamodb:PutItem']);
    });

    it('lets only the functions that change subscription state publish lifecycle events', () => {
      const publishing = (Object.keys(idOf) as FunctionName[]).filter((name) =>
        statementsOf(ids[idOf[name]]).some((s) => list(s.Action).includes('events:PutEvents')),
      );
      expect(publishing.sort()).toStrictEqual(['api', 'dispatcher', 'events', 'reconcile']);
    });

    it('lets every function read the credentials secret, and nothing else of Secrets Manager', () => {
      for (const name of Object.keys(idOf) as FunctionName[]) {
        const actions = statementsOf(ids[idOf[name]])
          .flatMap((s) => list(s.Action).map(String))
          .filter((a) => a.startsWith('secretsmanager:'));
        expect(actions, name).toStrictEqual(['secretsmanager:GetSecretValue']);
      }
    });
  });

  describe('WebSocket pushes', () => {
    it('lets every function that delivers or answers a bind post to connections, and no other', () => {
      // Function logical id prefix → the role its policies attach to.
      const roleOf = new Map<string, string>();
      for (const [id, r] of resources(template, 'AWS::Lambda::Function')) {
        const role = (r.Properties.Role as { 'Fn::GetAtt': [string, string] })['Fn::GetAtt'][0];
        roleOf.set(id, role);
      }
      const pushingRoles = new Set<string>();
      for (const [, r] of resources(template, 'AWS::IAM::Policy')) {
        const doc = r.Properties.PolicyDocument as { Statement: JsonObject[] };
        if (!doc.Statement.some((s) => list(s.Action).includes('execute-api:ManageConnections'))) continue;
        for (const role of r.Properties.Roles as { Ref: string }[]) pushingRoles.add(role.Ref);
      }
      // Logical ids are Functions<Name><hash>.
      const pushing = [...roleOf]
        .filter(([, role]) => pushingRoles.has(role))
        .map(([id]) => id.replace(/^Functions/, '').replace(/[0-9A-F]{8}$/, ''));
      // The API function serves POST /events (replays, other accounts) and handshakes on a PUT; the
      // reconcile function delivers what it accepted, as the events function does.
      expect(pushing.sort()).toStrictEqual(['Api', 'Dispatcher', 'Events', 'Reconcile', 'WsMessage']);
    });
  });

  describe('CloudTrail', () => {
    it('creates the trail, its bucket and the bucket policy only when CreateCloudTrailTrail is true', () => {
      const conditional = resources(template).filter(([, r]) => r.Condition === 'CreateCloudTrailTrailWanted');
      expect(conditional.map(([, r]) => r.Type).sort()).toStrictEqual([
        'AWS::CloudTrail::Trail',
        'AWS::S3::Bucket',
        'AWS::S3::BucketPolicy',
      ]);
      const condition = template.toJSON().Conditions.CreateCloudTrailTrailWanted;
      expect(evaluate(template, condition, {})).toBe(false);
      expect(evaluate(template, condition, { CreateCloudTrailTrail: 'true' })).toBe(true);
      template.hasParameter('CreateCloudTrailTrail', {
        Type: 'String',
        Default: 'false',
        AllowedValues: ['true', 'false'],
      });
    });

    it('records write management events into an encrypted, private, TLS-only bucket', () => {
      const bucket = only(template, 'AWS::S3::Bucket').id;
      template.hasResourceProperties('AWS::CloudTrail::Trail', {
        IsLogging: true,
        S3BucketName: { Ref: bucket },
        EventSelectors: [{ IncludeManagementEvents: true, ReadWriteType: 'WriteOnly' }],
      });
      template.hasResourceProperties('AWS::S3::Bucket', {
        BucketEncryption: {
          ServerSideEncryptionConfiguration: [{ ServerSideEncryptionByDefault: { SSEAlgorithm: 'AES256' } }],
        },
        PublicAccessBlockConfiguration: {
          BlockPublicAcls: true,
          BlockPublicPolicy: true,
          IgnorePublicAcls: true,
          RestrictPublicBuckets: true,
        },
      });
      template.hasResourceProperties('AWS::S3::BucketPolicy', {
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
          ]),
        },
      });
    });
  });

  describe('alarms', () => {
    it('alarms on what means a change may not reach its subscribers, each to the topic', () => {
      const topic = only(template, 'AWS::SNS::Topic').id;
      const alarm = (
        namespace: string,
        metric: string,
        dimension: JsonObject,
        rule: { stat?: string; above?: number; below?: number; missing?: string } = {},
      ) =>
        template.hasResourceProperties('AWS::CloudWatch::Alarm', {
          Namespace: namespace,
          MetricName: metric,
          Dimensions: [dimension],
          Statistic: rule.stat ?? 'Sum',
          ComparisonOperator: rule.below === undefined ? 'GreaterThanThreshold' : 'LessThanThreshold',
          Threshold: rule.below ?? rule.above ?? 0,
          EvaluationPeriods: 1,
          TreatMissingData: rule.missing ?? 'notBreaching',
          AlarmActions: [{ Ref: topic }],
        });
      const queue = { Name: 'QueueName', Value: { 'Fn::GetAtt': [dlq, 'QueueName'] } };
      const fn = (id: string) => ({ Name: 'FunctionName', Value: { Ref: id } });
      // Each event sent to the dead-letter queue (not once for all while it stays non-empty), and
      // one waiting 4 of the queue's 6 days.
      alarm('AWS/SQS', 'NumberOfMessagesSent', queue);
      alarm('AWS/SQS', 'ApproximateAgeOfOldestMessage', queue, { stat: 'Maximum', above: 4 * 86_400 });
      for (const id of [ids.events, ids.dispatcher, ids.api, ids.message, ids.connect]) {
        alarm('AWS/Lambda', 'Errors', fn(id));
        alarm('AWS/Lambda', 'Throttles', fn(id));
      }
      // Reconciliation (its alarms exist with it): the function failed, or a run did.
      alarm('AWS/Lambda', 'Errors', fn(ids.reconcile));
      alarm('AWS/Lambda', 'AsyncEventAge', fn(ids.events), { stat: 'Maximum', above: 300_000 });
      // A schedule that stopped (no data at all is the worst case).
      alarm('AWS/Lambda', 'Invocations', fn(ids.dispatcher), { below: 3, missing: 'breaching' });
      // The only ways left to lose an event silently: Lambda could not write the failure record to
      // the on-failure destination, or EventBridge could not write an undeliverable event to the DLQ.
      alarm('AWS/Lambda', 'DestinationDeliveryFailures', fn(ids.events));
      alarm('AWS/Events', 'InvocationsFailedToBeSentToDlq', { Name: 'RuleName', Value: { Ref: rule } });
      // A notification dead-lettered, from the broker's own metrics (EMF) of every function with lanes.
      const [deadLettered] = Object.values(
        template.findResources('AWS::CloudWatch::Alarm', {
          Properties: { AlarmDescription: Match.stringLikeRegexp('notification was dead-lettered') },
        }),
      ) as { Properties: { Metrics: JsonObject[]; AlarmActions: unknown } }[];
      expect(deadLettered?.Properties.AlarmActions).toEqual([{ Ref: topic }]);
      const stats = (deadLettered?.Properties.Metrics ?? []).flatMap((m) =>
        m.MetricStat === undefined ? [] : [m.MetricStat],
      );
      expect(stats).toEqual(
        ['events', 'api', 'message', 'dispatch', 'reconcile'].map((fn) => ({
          Metric: {
            Namespace: 'FhirSubscriptionBroker',
            MetricName: 'broker_notifications_total',
            Dimensions: expect.arrayContaining([
              { Name: 'Broker', Value: 'fhir-broker-' },
              { Name: 'Function', Value: fn },
              { Name: 'outcome', Value: 'dead-lettered' },
            ]),
          },
          Period: 300,
          Stat: 'Sum',
        })),
      );
      template.resourceCountIs('AWS::CloudWatch::Alarm', 19);
      const reconcileAlarms = resources(template, 'AWS::CloudWatch::Alarm').filter(
        ([, r]) => r.Condition !== undefined,
      );
      expect(reconcileAlarms.map(([id, r]) => [id.replace(/[0-9A-F]{8}$/, ''), r.Condition])).toEqual([
        ['AlarmsReconcileErrors', 'ReconcileOn'],
        ['AlarmsReconcileRunsFailed', 'ReconcileOn'],
      ]);
      // The failed runs, as the reconcile function's invocations write them (test/aws-reconcile.test.ts).
      template.hasResourceProperties('AWS::CloudWatch::Alarm', {
        Namespace: 'FhirSubscriptionBroker',
        MetricName: 'broker_reconcile_runs_total',
        Dimensions: [
          { Name: 'Broker', Value: 'fhir-broker-' },
          { Name: 'Function', Value: 'reconcile' },
          { Name: 'outcome', Value: 'failed' },
        ],
        Statistic: 'Sum',
        ComparisonOperator: 'GreaterThanThreshold',
        Threshold: 0,
        TreatMissingData: 'notBreaching',
        AlarmActions: [{ Ref: topic }],
      });
    });

    it('lets CloudWatch publish to the alarm topic (its TLS-only policy replaced the default one)', () => {
      const topic = only(template, 'AWS::SNS::Topic').id;
      const { resource } = only(template, 'AWS::SNS::TopicPolicy');
      expect(resource.Properties.Topics).toEqual([{ Ref: topic }]);
      const statements = (resource.Properties.PolicyDocument as { Statement: JsonObject[] }).Statement;
      expect(statements).toContainEqual(
        expect.objectContaining({
          Effect: 'Allow',
          Principal: { Service: 'cloudwatch.amazonaws.com' },
          Action: 'sns:Publish',
          Resource: { Ref: topic },
          Condition: expect.objectContaining({ StringEquals: { 'aws:SourceAccount': { Ref: 'AWS::AccountId' } } }),
        }),
      );
    });

    it('subscribes AlarmEmail to the alarm topic only when it is given', () => {
      template.hasResource('AWS::SNS::Subscription', {
        Condition: 'AlarmEmailSet',
        Properties: { Protocol: 'email', Endpoint: { Ref: 'AlarmEmail' } },
      });
      const condition = template.toJSON().Conditions.AlarmEmailSet;
      expect(evaluate(template, condition, {})).toBe(false);
      expect(evaluate(template, condition, { AlarmEmail: 'ops@example.org' })).toBe(true);
    });
  });

  describe('reconciliation', () => {
    const DATASTORE = '0123456789abcdef0123456789abcdef';
    const ON = { ReconcileEveryMinutes: '5' };
    const datastoreArn = (id: string) => `arn:aws:healthlake:${REGION}:${ACCOUNT}:datastore/fhir/${id}`;
    const reconcileId = (iam: StackIam) => {
      const { handler, description } = FUNCTION_ENTRIES.reconcile;
      return iam.functionId({ Handler: `index.${handler}`, Description: description });
    };

    it('takes ReconcileEveryMinutes from a fixed list (0, the default, is off) and ReconcileLagMinutes up to a day', () => {
      template.hasParameter('ReconcileEveryMinutes', {
        Type: 'String',
        Default: '0',
        AllowedValues: ['0', '5', '10', '15', '30', '60'],
      });
      expect(RECONCILE_EVERY_MINUTES).toEqual(['0', '5', '10', '15', '30', '60']);
      template.hasParameter('ReconcileLagMinutes', { Type: 'Number', Default: 15, MinValue: 0, MaxValue: 1440 });
      const on = template.toJSON().Conditions.ReconcileOn;
      expect(evaluate(template, on, {})).toBe(false);
      for (const minutes of RECONCILE_EVERY_MINUTES) {
        expect([minutes, evaluate(template, on, { ReconcileEveryMinutes: minutes })]).toEqual([
          minutes,
          minutes !== '0',
        ]);
      }
    });

    it('creates the function, its role, grants, log group, schedule and alarms only when it is on', () => {
      const conditional = resources(template)
        .filter(([, r]) => r.Condition?.startsWith('Reconcile'))
        .map(([id, r]) => `${r.Type} ${id.replace(/[0-9A-F]{8}$/, '')} if ${r.Condition}`);
      expect(conditional.sort()).toStrictEqual(
        [
          'AWS::CloudWatch::Alarm AlarmsReconcileErrors if ReconcileOn',
          'AWS::CloudWatch::Alarm AlarmsReconcileRunsFailed if ReconcileOn',
          'AWS::Events::Rule ReconcileSchedule if ReconcileOn',
          'AWS::IAM::Policy FunctionsReconcileServiceRoleDefaultPolicy if ReconcileOn',
          'AWS::IAM::Policy ReconcileSearchHealthLake if ReconcileSearchesHealthLake',
          'AWS::IAM::Role FunctionsReconcileServiceRole if ReconcileOn',
          'AWS::Lambda::EventInvokeConfig FunctionsReconcileEventInvokeConfig if ReconcileOn',
          'AWS::Lambda::Function FunctionsReconcile if ReconcileOn',
          'AWS::Lambda::Permission ReconcileScheduleAllowEventRuleBrokerFunctionsReconcile1CC39936 if ReconcileOn',
          'AWS::Logs::LogGroup FunctionsReconcileLogs if ReconcileOn',
        ].sort(),
      );
      const json = template.toJSON();
      expect(json.Conditions.ReconcileSearchesHealthLake).toEqual({
        'Fn::And': [{ Condition: 'ReconcileOn' }, { Condition: 'FhirReadHealthLake' }],
      });
      // Off (the defaults), the role the function would have is not there: nothing is granted.
      expect(new StackIam(json as TemplateJson).statements(reconcileId(new StackIam(json as TemplateJson)))).toEqual(
        [],
      );
    });

    it('lets no resource refer to one that may not exist (a deploy with reconciliation off would fail)', () => {
      const json = template.toJSON() as { Resources: Record<string, Resource>; Conditions: Record<string, Json> };
      /** Whether `a` holding means `b` holds: the same, or `a` is an Fn::And of `b` and more. */
      const implies = (a: string | undefined, b: string): boolean =>
        a === b ||
        (a !== undefined &&
          ((json.Conditions[a] as { 'Fn::And'?: Json[] })['Fn::And'] ?? []).some(
            (c) => (c as { Condition?: string }).Condition === b || implies((c as { Condition?: string }).Condition, b),
          ));
      const refs = (v: Json, out: Set<string>): Set<string> => {
        if (Array.isArray(v)) for (const x of v) refs(x, out);
        else if (v !== null && typeof v === 'object') {
          for (const [k, x] of Object.entries(v)) {
            if (k === 'Ref' && typeof x === 'string') out.add(x);
            else if (k === 'Fn::GetAtt' && Array.isArray(x)) out.add(x[0] as string);
            else refs(x, out);
          }
        }
        return out;
      };
      const dangling: string[] = [];
      for (const [id, r] of Object.entries(json.Resources)) {
        for (const target of refs(r.Properties, new Set())) {
          const condition = json.Resources[target]?.Condition;
          if (condition !== undefined && !implies(r.Condition, condition)) dangling.push(`${id} → ${target}`);
        }
        for (const target of list(r.DependsOn ?? []) as string[]) {
          const condition = json.Resources[target]?.Condition;
          if (condition !== undefined && !implies(r.Condition, condition)) dangling.push(`${id} depends on ${target}`);
        }
      }
      expect(dangling).toStrictEqual([]);
    });

    it('runs the function every ReconcileEveryMinutes minutes, without retries, and each run is over before the next', () => {
      const { id: ruleId, resource } = only(template, 'AWS::Events::Rule', {
        Targets: [Match.objectLike({ Arn: { 'Fn::GetAtt': [ids.reconcile, 'Arn'] } })],
      });
      expect(resource.Condition).toBe('ReconcileOn');
      for (const minutes of RECONCILE_EVERY_MINUTES.filter((m) => m !== '0')) {
        expect(evaluate(template, resource.Properties.ScheduleExpression, { ReconcileEveryMinutes: minutes })).toBe(
          `rate(${minutes} minutes)`,
        );
      }
      expect(resource.Properties.Targets).toStrictEqual([
        { Id: 'Target0', Arn: { 'Fn::GetAtt': [ids.reconcile, 'Arn'] }, RetryPolicy: { MaximumRetryAttempts: 0 } },
      ]);
      template.hasResourceProperties('AWS::Lambda::Permission', {
        Action: 'lambda:InvokeFunction',
        FunctionName: { 'Fn::GetAtt': [ids.reconcile, 'Arn'] },
        Principal: 'events.amazonaws.com',
        SourceArn: { 'Fn::GetAtt': [ruleId, 'Arn'] },
      });
      template.hasResourceProperties('AWS::Lambda::EventInvokeConfig', {
        FunctionName: { Ref: ids.reconcile },
        MaximumRetryAttempts: 0,
        MaximumEventAgeInSeconds: 60,
      });
      const props = template.toJSON().Resources[ids.reconcile].Properties;
      expect([props.Runtime, props.Architectures, props.MemorySize, props.Timeout]).toStrictEqual([
        'nodejs22.x',
        ['arm64'],
        512,
        240,
      ]);
      // A tick that waited its whole minute and then ran to the timeout is over when the next tick
      // of the shortest schedule comes: no reserved concurrency needed for one run at a time.
      expect(60 + props.Timeout).toBeLessThanOrEqual(5 * 60);
      expect(props.ReservedConcurrentExecutions).toBeUndefined();
    });

    it('configures the function as the broker reads it: the datastore it searches, BROKER_RECONCILE_EVERY and BROKER_RECONCILE_LAG', () => {
      const json = template.toJSON() as TemplateJson;
      const topicsDir = fileURLToPath(new URL('../../subscriptions/topics', import.meta.url));
      const secrets = {
        BROKER_API_KEYS: 'local:local-token-0123456789abcdef',
        BROKER_INGEST_TOKEN: 'ingest-token-0123456789abcdef',
        BROKER_WS_TOKEN_SECRET: 'ws-secret-0123456789abcdefghijklmnop',
      };
      const cases = [
        [
          { ...ON, FhirRead: 'healthlake', HealthLakeDatastoreId: DATASTORE },
          `https://healthlake.${REGION}.amazonaws.com/datastore/${DATASTORE}/r4`,
          '5m',
          '15m',
        ],
        [
          { ReconcileEveryMinutes: '60', ReconcileLagMinutes: '0', FhirRead: 'https://fhir.example.org/r4' },
          'https://fhir.example.org/r4',
          '60m',
          '0m',
        ],
      ] as const;
      for (const [parameters, base, every, lag] of cases) {
        const iam = new StackIam(json, parameters);
        const env = iam.environment(reconcileId(iam));
        const events = iam.environment(fnIdOf(iam, 'events'));
        const { BROKER_DEAD_LETTER_QUEUE_URL: _queue, ...shared } = events;
        // The other functions' environment, and its own three.
        expect(env).toStrictEqual({
          ...shared,
          BROKER_FHIR_READ: base,
          BROKER_RECONCILE_EVERY: every,
          BROKER_RECONCILE_LAG: lag,
        });
        // What the broker makes of it (a typo here would stop every run at start).
        const config = loadConfig({ ...env, ...secrets, BROKER_TOPICS_DIR: topicsDir, AWS_REGION: REGION });
        expect(config.reconcile).toEqual({
          everyMs: Number.parseInt(every, 10) * 60_000,
          lagMs: Number.parseInt(lag, 10) * 60_000,
        });
        expect(config.fhirRead).toMatchObject({
          baseUrl: base,
          auth: base.includes('healthlake') ? 'sigv4' : 'none',
          region: REGION,
        });
      }
    });

    it('refuses a schedule with nothing to search: no FhirRead, or healthlake without HealthLakeDatastoreId', () => {
      const rules = (template.toJSON() as { Rules: Record<string, Json> }).Rules;
      const [ruleId, rule] = Object.entries(rules).find(([id]) => id.startsWith('ReconcileReadsAServer')) as [
        string,
        { RuleCondition: Json; Assertions: { Assert: Json; AssertDescription: string }[] },
      ];
      expect(ruleId).toMatch(/^ReconcileReadsAServer/);
      /** What CloudFormation would refuse the parameters with (the failing assertions' descriptions). */
      const refusals = (parameters: Record<string, string>): string[] =>
        evaluate(template, rule.RuleCondition, parameters) === true
          ? rule.Assertions.filter((a) => evaluate(template, a.Assert, parameters) !== true).map(
              (a) => a.AssertDescription,
            )
          : [];
      const noServer =
        'ReconcileEveryMinutes needs FhirRead: healthlake (with HealthLakeDatastoreId) or the FHIR base URL whose changes it searches';
      const noDatastore =
        'ReconcileEveryMinutes with FhirRead=healthlake needs HealthLakeDatastoreId: the datastore whose changes it searches';
      expect(refusals({})).toEqual([]);
      expect(refusals({ FhirRead: 'healthlake' })).toEqual([]);
      expect(refusals(ON)).toEqual([noServer]);
      expect(refusals({ ...ON, HealthLakeDatastoreId: DATASTORE })).toEqual([noServer]);
      expect(refusals({ ...ON, FhirRead: 'healthlake' })).toEqual([noDatastore]);
      expect(refusals({ ...ON, FhirRead: 'healthlake', HealthLakeDatastoreId: DATASTORE })).toEqual([]);
      expect(refusals({ ...ON, FhirRead: 'https://fhir.example.org/r4' })).toEqual([]);
    });

    it('grants what the events function has to accept and deliver, and SearchWithGet on the one datastore with FhirRead=healthlake', () => {
      const json = template.toJSON() as TemplateJson;
      const granted = (parameters: Record<string, string>) => {
        const iam = new StackIam(json, parameters);
        const id = reconcileId(iam);
        const statements = iam.statements(id);
        const targets = targetsOf(iam.environment(id), iam.failureDestinations(id));
        return {
          statements,
          access: grantedAccess(statements, targets),
          unaccounted: unaccountedGrants(statements, targets).map((g) => g.replace(/^[^:]+: /, '')),
          events: grantedAccess(iam.statements(fnIdOf(iam, 'events')), targets),
        };
      };
      const healthlake = granted({ ...ON, FhirRead: 'healthlake', HealthLakeDatastoreId: DATASTORE });
      // The events function's access but its on-failure destination (the schedule has none).
      expect(healthlake.access).toStrictEqual(healthlake.events.filter((a) => a !== 'failures:send'));
      expect(healthlake.access).toStrictEqual([
        'bus:put',
        'connections:manage',
        'connections:read',
        'connections:write',
        'eventIds:read',
        'eventIds:write',
        'notifications:read',
        'notifications:write',
        'secret:read',
        'subscriptionTypes:read',
        'subscriptionTypes:write',
        'subscriptions:read',
        'subscriptions:write',
      ]);
      // And beyond those, only the search, on the one datastore.
      expect(healthlake.unaccounted).toStrictEqual([`healthlake:SearchWithGet on ${datastoreArn(DATASTORE)}`]);
      expect(allows(healthlake.statements, 'healthlake:SearchWithGet', datastoreArn(DATASTORE))).toBe(true);
      expect(
        allows(healthlake.statements, 'healthlake:SearchWithGet', datastoreArn('fedcba98765432100123456789abcdef')),
      ).toBe(false);
      expect(allows(healthlake.statements, 'healthlake:ReadResource', datastoreArn(DATASTORE))).toBe(false);

      // Another FHIR server: the same table access, nothing of HealthLake.
      const url = granted({ ...ON, FhirRead: 'https://fhir.example.org/r4' });
      expect(url.access).toStrictEqual(healthlake.access);
      expect(url.unaccounted).toStrictEqual([]);

      // Off: nothing at all.
      expect(granted({ FhirRead: 'healthlake', HealthLakeDatastoreId: DATASTORE }).statements).toStrictEqual([]);
    });
  });

  it('outputs the HTTP API URL, WebSocket URL, secret ARN, bus name and DLQ URL', () => {
    const outputs = template.toJSON().Outputs as Record<string, { Value: Json }>;
    expect(Object.keys(outputs).sort()).toStrictEqual([
      'DeadLetterQueueUrl',
      'EventBusName',
      'HttpApiUrl',
      'SecretArn',
      'WebSocketUrl',
    ]);
    expect(outputs.DeadLetterQueueUrl?.Value).toStrictEqual({ Ref: dlq });
  });

  it('has no circular dependency between resources', () => {
    const all = new Map(resources(template));
    const edges = (r: Resource): string[] => {
      const found = new Set<string>(list(r.DependsOn ?? []) as string[]);
      const walk = (v: Json) => {
        if (Array.isArray(v)) v.forEach(walk);
        else if (v !== null && typeof v === 'object') {
          for (const [k, x] of Object.entries(v)) {
            if (k === 'Ref' && typeof x === 'string' && all.has(x)) found.add(x);
            else if (k === 'Fn::GetAtt' && Array.isArray(x) && all.has(x[0] as string)) found.add(x[0] as string);
            else walk(x);
          }
        }
      };
      walk(r.Properties);
      return [...found];
    };
    const state = new Map<string, 'visiting' | 'done'>();
    const visit = (id: string, path: string[]): void => {
      if (state.get(id) === 'done') return;
      if (state.get(id) === 'visiting') throw new Error(`cycle: ${[...path, id].join(' → ')}`);
      state.set(id, 'visiting');
      for (const next of edges(all.get(id) as Resource)) visit(next, [...path, id]);
      state.set(id, 'done');
    };
    expect(() => {
      for (const id of all.keys()) visit(id, []);
    }).not.toThrow();
  });

  it('bundles each entry with the local esbuild: ESM, require shim, source map, the AWS SDK inside', () => {
    const outdir = mkdtempSync(join(tmpdir(), 'broker-synth-'));
    try {
      const app = new App({ outdir });
      const stack = new BrokerStack(app, 'Bundled');
      app.synth();
      const functions = resources(Template.fromStack(stack), 'AWS::Lambda::Function');
      expect(functions).toHaveLength(7);
      for (const [id, fn] of functions) {
        const handler = String(fn.Properties.Handler).replace(/^index\./, '');
        const asset = join(outdir, `asset.${String((fn.Properties.Code as JsonObject).S3Key).replace(/\.zip$/, '')}`);
        const code = readFileSync(join(asset, 'index.mjs'), 'utf8');
        expect(code.startsWith("import { createRequire } from 'module';"), id).toBe(true);
        expect(code, id).toMatch(new RegExp(`export\\{[^}]*\\bas ${handler}\\b`));
        expect(existsSync(join(asset, 'index.mjs.map')), id).toBe(true);
        const imports = [...code.matchAll(/\bfrom"([@\w:./-]+)"/g)].map((m) => m[1] as string);
        // Nothing left to the runtime but Node's own modules: not even the AWS SDK.
        expect(
          imports.filter((m) => !m.startsWith('node:')),
          id,
        ).toStrictEqual([]);
        expect(code, id).toContain('DynamoDBClient');
      }
    } finally {
      rmSync(outdir, { recursive: true, force: true });
    }
  });
});
