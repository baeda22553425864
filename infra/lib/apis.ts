import {
  type CfnStage,
  HttpApi,
  HttpRoute,
  HttpRouteKey,
  WebSocketApi,
  WebSocketStage,
} from 'aws-cdk-lib/aws-apigatewayv2';
import { HttpLambdaIntegration, WebSocketLambdaIntegration } from 'aws-cdk-lib/aws-apigatewayv2-integrations';
import type { IFunction } from 'aws-cdk-lib/aws-lambda';
import { Construct } from 'constructs';

export const WEBSOCKET_STAGE = 'prod';

/**
 * Requests per second (steady, burst) each API takes before API Gateway answers 429 itself: a flood
 * (anonymous `$connect`s, or one client's loop) is refused at the edge instead of taking the
 * account's Lambda concurrency from the events function and a DynamoDB write each. Well above
 * what the bench's clients send; raise them here for a bigger deployment (or per route in the console).
 */
export const HTTP_THROTTLE = { rateLimit: 1_000, burstLimit: 2_000 } as const;
export const WEBSOCKET_THROTTLE = { rateLimit: 500, burstLimit: 1_000 } as const;

export interface ApiHandlers {
  /** Every HTTP request (`$default` route, payload format 2.0). */
  readonly http: IFunction;
  readonly connect: IFunction;
  readonly disconnect: IFunction;
  /** Every WebSocket message: the broker's frames are text commands, not routable JSON. */
  readonly message: IFunction;
}

/**
 * The HTTP API and the WebSocket API. They are created before the functions and routed after
 * them: the functions' environment names the APIs' URLs, and the routes name the functions, so
 * splitting the two steps keeps the dependency graph acyclic.
 */
export class BrokerApis extends Construct {
  readonly httpApi: HttpApi;
  readonly webSocketApi: WebSocketApi;
  readonly webSocketStage: WebSocketStage;

  constructor(scope: Construct, id: string) {
    super(scope, id);
    this.httpApi = new HttpApi(this, 'Http', {
      apiName: 'fhir-broker-http',
      description: 'fhir-subscription-broker REST API (/fhir, /events, /healthz, /metrics, /live)',
      createDefaultStage: true,
    });
    // The default stage takes no throttle settings through HttpApi's props.
    const stage = this.httpApi.defaultStage;
    if (stage === undefined) throw new TypeError('the HTTP API has no default stage');
    (stage.node.defaultChild as CfnStage).addPropertyOverride('DefaultRouteSettings', {
      ThrottlingRateLimit: HTTP_THROTTLE.rateLimit,
      ThrottlingBurstLimit: HTTP_THROTTLE.burstLimit,
    });
    this.webSocketApi = new WebSocketApi(this, 'WebSocket', {
      apiName: 'fhir-broker-ws',
      description: 'fhir-subscription-broker WebSocket channel (bind-with-token, R4 bind)',
    });
    this.webSocketStage = new WebSocketStage(this, 'WebSocketStage', {
      webSocketApi: this.webSocketApi,
      stageName: WEBSOCKET_STAGE,
      autoDeploy: true,
      throttle: WEBSOCKET_THROTTLE,
    });
  }

  /** `https://{id}.execute-api.{region}.amazonaws.com`: the base of every REST URL. */
  get httpUrl(): string {
    return this.httpApi.apiEndpoint;
  }

  /** `wss://{id}.execute-api.{region}.amazonaws.com/prod`: what clients connect to. */
  get webSocketUrl(): string {
    return this.webSocketStage.url;
  }

  /** `https://{id}.execute-api.{region}.amazonaws.com/prod`: the PostToConnection endpoint. */
  get managementEndpoint(): string {
    return this.webSocketStage.callbackUrl;
  }

  route(handlers: ApiHandlers): void {
    new HttpRoute(this, 'HttpDefaultRoute', {
      httpApi: this.httpApi,
      routeKey: HttpRouteKey.DEFAULT,
      integration: new HttpLambdaIntegration('HttpIntegration', handlers.http),
    });
    const ws = this.webSocketApi;
    ws.addRoute('$connect', { integration: new WebSocketLambdaIntegration('ConnectIntegration', handlers.connect) });
    ws.addRoute('$disconnect', {
      integration: new WebSocketLambdaIntegration('DisconnectIntegration', handlers.disconnect),
    });
    ws.addRoute('$default', { integration: new WebSocketLambdaIntegration('MessageIntegration', handlers.message) });
  }
}
