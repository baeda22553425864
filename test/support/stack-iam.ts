/**
 * A synthesized CloudFormation template as IAM sees it: CloudFormation's intrinsic functions
 * resolved to concrete strings (one made-up account and region), each Lambda function's
 * environment and role statements, and a small policy evaluator (Allow statements with
 * wildcards; anything it cannot evaluate soundly, such as Deny, Condition or NotAction, throws).
 */

export const ACCOUNT = '111122223333';
export const REGION = 'us-east-1';

type Json = unknown;
interface Resource {
  readonly Type: string;
  readonly Properties?: Record<string, Json>;
  /** A condition the resource exists under (a stack parameter's default decides it here). */
  readonly Condition?: string;
}
export interface TemplateJson {
  readonly Resources: Readonly<Record<string, Resource>>;
  readonly Parameters?: Readonly<Record<string, { readonly Default?: string }>>;
  readonly Conditions?: Readonly<Record<string, Json>>;
}

export interface Statement {
  /** Where it comes from (the policy's logical id). */
  readonly where: string;
  readonly actions: readonly string[];
  readonly resources: readonly string[];
}

export class StackIam {
  readonly #resources: Readonly<Record<string, Resource>>;
  readonly #parameters: Readonly<Record<string, { readonly Default?: string }>>;
  readonly #conditions: Readonly<Record<string, Json>>;
  readonly #values: Readonly<Record<string, string>>;

  /** `parameters`: stack parameter values as deployed; any other parameter takes its default. */
  constructor(template: TemplateJson, parameters: Readonly<Record<string, string>> = {}) {
    this.#resources = template.Resources;
    this.#parameters = template.Parameters ?? {};
    this.#conditions = template.Conditions ?? {};
    this.#values = parameters;
  }

  /** A named condition, with every stack parameter at its default (`Fn::Equals`, `Fn::Not`, `Fn::And`, `Fn::Or`). */
  condition(name: string): boolean {
    const expression = this.#conditions[name];
    if (expression === undefined) throw new TypeError(`no condition ${name}`);
    return this.#evaluate(expression);
  }

  #evaluate(value: Json): boolean {
    const [key, arg] = Object.entries((value ?? {}) as Record<string, Json>)[0] ?? [];
    const args = (Array.isArray(arg) ? arg : []) as Json[];
    if (key === 'Fn::Equals') return this.resolve(args[0]) === this.resolve(args[1]);
    if (key === 'Fn::Not') return !this.#evaluate(args[0]);
    if (key === 'Fn::And') return args.every((a) => this.#evaluate(a));
    if (key === 'Fn::Or') return args.some((a) => this.#evaluate(a));
    if (key === 'Condition' && typeof arg === 'string') return this.condition(arg);
    throw new TypeError(`cannot evaluate the condition ${JSON.stringify(value)}`);
  }

  /** The logical id of the one Lambda function whose properties include `props`. */
  functionId(props: Readonly<Record<string, string>>): string {
    const found = Object.entries(this.#resources).filter(
      ([, r]) => r.Type === 'AWS::Lambda::Function' && Object.entries(props).every(([k, v]) => r.Properties?.[k] === v),
    );
    if (found.length !== 1) throw new TypeError(`${found.length} functions match ${JSON.stringify(props)}`);
    return (found[0] as [string, Resource])[0];
  }

  /** The function's environment variables, resolved. */
  environment(functionId: string): Record<string, string> {
    const vars = ((this.#props(functionId).Environment as { Variables?: Record<string, Json> } | undefined)
      ?.Variables ?? {}) as Record<string, Json>;
    return Object.fromEntries(Object.entries(vars).map(([k, v]) => [k, this.resolve(v)]));
  }

  /** The managed policies attached to the function's role, resolved. */
  managedPolicies(functionId: string): string[] {
    const role = this.#props(this.#roleOf(functionId));
    return ((role.ManagedPolicyArns ?? []) as Json[]).map((arn) => this.resolve(arn));
  }

  /**
   * The queues the Lambda service sends failed asynchronous invocations to, with the function's
   * own role: access the role needs though the handler never calls SQS.
   */
  failureDestinations(functionId: string): string[] {
    return Object.values(this.#resources)
      .filter(
        (r) =>
          r.Type === 'AWS::Lambda::EventInvokeConfig' &&
          (r.Properties?.FunctionName as { Ref?: string } | undefined)?.Ref === functionId,
      )
      .flatMap((r) => {
        const destination = (r.Properties?.DestinationConfig as { OnFailure?: { Destination: Json } } | undefined)
          ?.OnFailure?.Destination;
        return destination === undefined ? [] : [this.resolve(destination)];
      });
  }

  /** Every statement that applies to the function's role (inline and attached `AWS::IAM::Policy`), resolved. */
  statements(functionId: string): Statement[] {
    const roleId = this.#roleOf(functionId);
    const documents: [string, Json][] = [];
    for (const [id, r] of Object.entries(this.#resources)) {
      if (r.Type !== 'AWS::IAM::Policy') continue;
      // A policy that exists only under a condition the defaults leave false is not deployed.
      if (r.Condition !== undefined && !this.condition(r.Condition)) continue;
      const roles = (r.Properties?.Roles ?? []) as { Ref?: string }[];
      if (roles.some((ref) => ref.Ref === roleId)) documents.push([id, r.Properties?.PolicyDocument]);
    }
    for (const p of (this.#props(roleId).Policies ?? []) as { PolicyDocument: Json }[]) {
      documents.push([roleId, p.PolicyDocument]);
    }
    return documents.flatMap(([where, doc]) =>
      ((doc as { Statement: Record<string, Json>[] }).Statement ?? []).map((s) => {
        const unsupported = Object.keys(s).filter((k) => !['Effect', 'Action', 'Resource', 'Sid'].includes(k));
        if (s.Effect !== 'Allow' || unsupported.length > 0) {
          throw new TypeError(`${where}: cannot evaluate ${JSON.stringify(s)} (only Allow, Action, Resource)`);
        }
        return {
          where,
          actions: list(s.Action).map(String),
          resources: list(s.Resource).map((r) => this.resolve(r)),
        };
      }),
    );
  }

  /** CloudFormation's `Ref`, `Fn::GetAtt` and `Fn::Join`, for the resource types the broker's policies name. */
  resolve(value: Json): string {
    if (typeof value === 'string') return value;
    const [key, arg] = Object.entries((value ?? {}) as Record<string, Json>)[0] ?? [];
    if (key === 'Fn::Join' && Array.isArray(arg)) {
      const [separator, parts] = arg as [string, Json[]];
      return parts.map((p) => this.resolve(p)).join(separator);
    }
    if (key === 'Ref' && typeof arg === 'string') return this.#ref(arg);
    if (key === 'Fn::If' && Array.isArray(arg)) {
      const [name, yes, no] = arg as [string, Json, Json];
      return this.resolve(this.condition(name) ? yes : no);
    }
    if (key === 'Fn::GetAtt' && Array.isArray(arg)) return this.#getAtt(arg[0] as string, arg[1] as string);
    throw new TypeError(`cannot resolve ${JSON.stringify(value)}`);
  }

  #ref(id: string): string {
    const pseudo: Record<string, string> = {
      'AWS::AccountId': ACCOUNT,
      'AWS::Region': REGION,
      'AWS::Partition': 'aws',
      'AWS::URLSuffix': 'amazonaws.com',
    };
    if (pseudo[id] !== undefined) return pseudo[id];
    // A stack parameter: as deployed, with its default unless given.
    const parameter = this.#parameters[id];
    if (parameter !== undefined) return this.#values[id] ?? parameter.Default ?? '';
    const r = this.#resources[id];
    switch (r?.Type) {
      case 'AWS::SecretsManager::Secret':
        return `arn:aws:secretsmanager:${REGION}:${ACCOUNT}:secret:${id}`;
      case 'AWS::Events::EventBus':
        return String(r.Properties?.Name);
      case 'AWS::DynamoDB::Table':
        return String(r.Properties?.TableName);
      case 'AWS::ApiGatewayV2::Api':
        return id.toLowerCase();
      case 'AWS::ApiGatewayV2::Stage':
        return String(r.Properties?.StageName);
      case 'AWS::SQS::Queue':
        return `https://sqs.${REGION}.amazonaws.com/${ACCOUNT}/${id}`;
      default:
        throw new TypeError(`cannot resolve Ref ${id} (${r?.Type})`);
    }
  }

  #getAtt(id: string, attribute: string): string {
    const r = this.#resources[id];
    if (r?.Type === 'AWS::DynamoDB::Table' && attribute === 'Arn') return tableArn(this.#ref(id));
    if (r?.Type === 'AWS::Events::EventBus' && attribute === 'Arn') return eventBusArn(this.#ref(id));
    if (r?.Type === 'AWS::SQS::Queue' && attribute === 'Arn') return `arn:aws:sqs:${REGION}:${ACCOUNT}:${id}`;
    if (r?.Type === 'AWS::ApiGatewayV2::Api' && attribute === 'ApiEndpoint') {
      return `https://${this.#ref(id)}.execute-api.${REGION}.amazonaws.com`;
    }
    throw new TypeError(`cannot resolve Fn::GetAtt ${id}.${attribute} (${r?.Type})`);
  }

  #roleOf(functionId: string): string {
    const role = this.#props(functionId).Role as { 'Fn::GetAtt'?: [string, string] } | undefined;
    const id = role?.['Fn::GetAtt']?.[0];
    if (id === undefined) throw new TypeError(`${functionId} has no role of this stack`);
    return id;
  }

  #props(id: string): Record<string, Json> {
    const r = this.#resources[id];
    if (r === undefined) throw new TypeError(`no resource ${id}`);
    return r.Properties ?? {};
  }
}

/** Whether some statement allows `action` on `resource` (IAM wildcards `*` and `?`; actions case-insensitive). */
export function allows(statements: readonly Statement[], action: string, resource: string): boolean {
  return statements.some(
    (s) => s.actions.some((a) => glob(a, 'i').test(action)) && s.resources.some((r) => glob(r).test(resource)),
  );
}

export const tableArn = (name: string): string => `arn:aws:dynamodb:${REGION}:${ACCOUNT}:table/${name}`;
export const eventBusArn = (name: string): string => `arn:aws:events:${REGION}:${ACCOUNT}:event-bus/${name}`;
export const connectionArn = (apiId: string, stage: string, method: string, connectionId: string): string =>
  `arn:aws:execute-api:${REGION}:${ACCOUNT}:${apiId}/${stage}/${method}/@connections/${connectionId}`;

function glob(pattern: string, flags = ''): RegExp {
  const source = pattern
    .split('')
    .map((c) => (c === '*' ? '.*' : c === '?' ? '.' : c.replace(/[\\^$.+()[\]{}|/]/g, '\\$&')))
    .join('');
  return new RegExp(`^${source}$`, flags);
}

function list(v: Json): Json[] {
  return Array.isArray(v) ? v : v === undefined ? [] : [v];
}
