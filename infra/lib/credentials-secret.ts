import { Fn, RemovalPolicy, SecretValue } from 'aws-cdk-lib';
import { Secret } from 'aws-cdk-lib/aws-secretsmanager';
import { Construct } from 'constructs';

/** The client id of the API key the stack generates; more clients are added by editing the secret. */
export const GENERATED_CLIENT_ID = 'local';

/**
 * The broker's credentials as one JSON secret, the only one the functions read:
 * `{"apiKeys":"local:<random>","ingestToken":"<random>","wsTokenSecret":"<random>"}`
 * (the values of `BROKER_API_KEYS`, `BROKER_INGEST_TOKEN`, `BROKER_WS_TOKEN_SECRET`).
 *
 * Secrets Manager generates one random value per secret, and CloudFormation resolves dynamic
 * references only after intrinsic functions, so the three values cannot be cut from one random
 * string. Three small generator secrets each hold one random value; the credentials secret is
 * composed of `{{resolve:secretsmanager:…}}` references to them, which CloudFormation resolves
 * at deploy time. No secret material is in the template. Edit the credentials secret to rotate
 * or add clients; the generators are only seeds and nothing reads them at run time.
 */
export class CredentialsSecret extends Construct {
  readonly secret: Secret;

  constructor(scope: Construct, id: string) {
    super(scope, id);
    // Letters and digits only: the values sit inside `clientId:token,…` lists and JSON strings.
    const random = (generatorId: string, length: number, what: string) =>
      new Secret(this, generatorId, {
        description: `fhir-subscription-broker: random seed for ${what} (read the Credentials secret instead)`,
        generateSecretString: { passwordLength: length, excludePunctuation: true, includeSpace: false },
      }).secretValue;
    const apiToken = random('ApiTokenSeed', 40, 'the generated API key');
    const ingestToken = random('IngestTokenSeed', 40, 'the ingest token');
    // 64 characters: an HMAC key well above config's 32-character minimum.
    const wsTokenSecret = random('WsTokenSecretSeed', 64, 'the WebSocket binding-token key');

    this.secret = new Secret(this, 'Credentials', {
      description: 'fhir-subscription-broker credentials: apiKeys, ingestToken, wsTokenSecret',
      secretObjectValue: {
        // Only a dynamic reference with a constant prefix: "unsafe" puts nothing secret in the template.
        apiKeys: SecretValue.unsafePlainText(Fn.join('', [`${GENERATED_CLIENT_ID}:`, apiToken.unsafeUnwrap()])),
        ingestToken,
        wsTokenSecret,
      },
      // Kept when the stack is deleted, like the tables: the subscriptions they keep belong to its
      // client ids, and operators edit it (clients added, tokens rotated). It holds the values
      // themselves (CloudFormation resolves the seeds' references when it writes it).
      removalPolicy: RemovalPolicy.RETAIN,
    });
  }
}
