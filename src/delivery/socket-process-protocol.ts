import type { MetricName } from '../observability/metrics.js';
import type { HubLimits } from './local-websocket-hub.js';
import type { ManyOutcome, SendOutcome } from './websocket-port.js';

/**
 * IPC between the broker's main process and its socket processes (SocketProcessHub ↔
 * socket-process.ts). One channel per child: messages arrive in the order they were sent, which
 * keeps every connection's frames in order. `rq` numbers a request whose answer is a `re`.
 */

/** Main → socket process. `up` carries the raw socket of an HTTP upgrade request as its handle. */
export type ToSocketProcess =
  | {
      readonly t: 'up';
      readonly id: string;
      readonly owner?: string;
      readonly url: string;
      readonly headers: Readonly<Record<string, string | string[] | undefined>>;
      /** Bytes that followed the upgrade request (base64). */
      readonly head: string;
    }
  | { readonly t: 'send'; readonly rq: number; readonly id: string; readonly text: string }
  | { readonly t: 'many'; readonly rq: number; readonly ids: readonly string[]; readonly text: string }
  | { readonly t: 'close'; readonly id: string; readonly code: number; readonly reason: string }
  | { readonly t: 'open?'; readonly rq: number; readonly id: string }
  /** Answered (`true`) once the connection has room for more (LocalWebSocketHub.drained), or is gone. */
  | { readonly t: 'drained?'; readonly rq: number; readonly id: string }
  /** The connection now holds a binding, or none (its bind window starts). */
  | { readonly t: 'bound'; readonly id: string; readonly bound: boolean }
  | { readonly t: 'closeAll'; readonly code: number; readonly reason: string };

/** Socket process → main. */
export type FromSocketProcess =
  | { readonly t: 'ready' }
  | { readonly t: 'msg'; readonly id: string; readonly text: string }
  | { readonly t: 'closed'; readonly id: string }
  | { readonly t: 're'; readonly rq: number; readonly v: SendOutcome | ManyOutcome | boolean }
  | {
      readonly t: 'inc';
      readonly name: MetricName;
      readonly labels: Readonly<Record<string, string>>;
      readonly by: number;
    };

/** Passed to a socket process as `BROKER_SOCKET_PROCESS_CONFIG` (JSON). */
export interface SocketProcessConfig {
  readonly limits: Partial<HubLimits>;
  readonly logLevel: string;
}
