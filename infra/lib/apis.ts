import { HttpApi, HttpRoute, HttpRouteKey, WebSocketApi, WebSocketStage } from 'aws-cdk-lib/aws-apigatewayv2';
import { HttpLambdaIntegration, WebSocketLambdaIntegration } from 'aws-cdk-lib/aws-apigatewayv2-integrations';
import type { IFunction } from 'aws-cdk-lib/aws-lambda';
import { Construct } from 'constructs';

export const WEBSOCKET_STAGE = 'prod';

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
    this.webSocketApi = new WebSocketApi(this, 'WebSocket', {
      apiName: 'fhir-broker-ws',
      description: 'fhir-subscription-broker WebSocket channel (bind-with-token, R4 bind)',
    });
    this.webSocketStage = new WebSocketStage(this, 'WebSocketStage', {
      webSocketApi: this.webSocketApi,
      stageName: WEBSOCKET_STAGE,
      autoDeploy: true,
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
