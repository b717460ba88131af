// Types of relay-client.js (hand-written; tests/packaging/test_js_client_package.py compiles
// a strict TypeScript program against them, and tests/packaging/test_js_types.py checks the
// frame interfaces below against the protocol's pydantic models, field by field).

import POLICY from "./client-policy.js";

export { POLICY };

/** The subprotocol and protocol version this client speaks. */
export declare const PROTOCOL: "llm-relay.v1";

// ------------------------------------------------------------------ frames the relay sends

export interface Limits {
  max_streams: number;
  max_frame_bytes: number;
  max_messages_bytes?: number | null;
  detach_grace?: number;
}

export interface WelcomeFrame {
  type: "welcome";
  protocol: string;
  session_id: string;
  models: string[];
  limits: Limits;
}

export interface StartedFrame {
  type: "started";
  id: string;
  seq: number;
  model: string;
  stream_key?: string | null;
}

export interface ResumedFrame {
  type: "resumed";
  id: string;
  stream_key: string;
  after_seq: number;
}

export interface TokenFrame {
  type: "token";
  id: string;
  seq: number;
  text: string;
}

export interface ReasoningFrame {
  type: "reasoning";
  id: string;
  seq: number;
  text: string;
}

export interface RefusalFrame {
  type: "refusal";
  id: string;
  seq: number;
  text: string;
}

export interface ToolCallChunkFrame {
  type: "tool_call_chunk";
  id: string;
  seq: number;
  index: number;
  call_id: string;
  name?: string | null;
  arguments_delta: string;
}

export interface ToolCallCompleteFrame {
  type: "tool_call_complete";
  id: string;
  seq: number;
  index: number;
  call_id: string;
  name: string;
  arguments: string;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** True when the provider reported none and the relay estimated it. */
  estimated: boolean;
}

export interface ErrorInfo {
  code: string;
  message: string;
  retry_after?: number | null;
}

export type FinishStatus = "completed" | "cancelled" | "failed" | "timeout";

export interface FinishFrame {
  type: "finish";
  id: string;
  seq: number;
  status: FinishStatus;
  reason?: string | null;
  usage: Usage;
  error?: ErrorInfo | null;
}

export interface ErrorFrame {
  type: "error";
  code: string;
  message: string;
  ref?: string | null;
  id?: string | null;
  retry_after?: number | null;
}

export interface PongFrame {
  type: "pong";
  data?: unknown;
}

/** What a RelayStream yields, in `seq` order, ending with its `finish`. */
export type StreamFrame =
  | StartedFrame
  | TokenFrame
  | ReasoningFrame
  | RefusalFrame
  | ToolCallChunkFrame
  | ToolCallCompleteFrame
  | FinishFrame;

/** Every frame type the relay sends (`onframe` also sees types this version does not know). */
export type ServerFrame = WelcomeFrame | ResumedFrame | ErrorFrame | PongFrame | StreamFrame;

// ------------------------------------------------------------------ what a start carries

export interface ChatMessage {
  role: "system" | "developer" | "user" | "assistant" | "tool";
  content?: string | Array<Record<string, unknown>> | null;
  [field: string]: unknown;
}

export interface Tool {
  type: "function";
  function: { name: string; description?: string | null; parameters?: Record<string, unknown> | null };
}

export type ToolChoice = "auto" | "none" | "required" | Record<string, unknown>;

/** The protocol's allowlist of sampling parameters. */
export interface Params {
  temperature?: number;
  top_p?: number;
  max_tokens?: number;
  stop?: string | string[];
  seed?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
  response_format?: Record<string, unknown>;
}

export interface StartOptions {
  model: string;
  messages: ChatMessage[];
  tools?: Tool[];
  tool_choice?: ToolChoice;
  params?: Params;
  /** The stream id (default: a fresh one). */
  id?: string;
}

/** `RelayClient.watch` options (PROTOCOL.md "Viewers"). */
export interface WatchOptions {
  /** Frames after this seq are sent (default 0: from the stream's first frame). */
  afterSeq?: number;
  /** The id the stream gets on this connection (default: a fresh one). */
  id?: string;
  /** Become the stream's only attachment; every other one ends `stream_taken_over`. */
  takeover?: boolean;
}

// ------------------------------------------------------------------ policy helpers

export declare const FRAME_TYPES: Readonly<{
  client: readonly string[];
  server: readonly string[];
  stream: readonly string[];
}>;

export interface CloseCodeInfo {
  readonly name: string;
  readonly meaning: string;
  readonly retryable: boolean;
}

export declare const CLOSE_CODES: Readonly<Record<number, CloseCodeInfo>>;

/** The client frame `type` with `fields` in the model's field order (TypeError if unknown). */
export declare function clientFrame(type: string, fields?: Record<string, unknown>): Record<string, unknown>;
/** One line a UI can show for a close code. */
export declare function closeMeaning(code: number): string;
/** True when reconnecting (with backoff) may succeed without changing anything. */
export declare function isRetryable(code: number): boolean;

export interface CloseDecision {
  code: number;
  reason: string;
  retry: boolean;
  meaning: string;
  refreshToken: boolean;
  resendUnansweredStarts: boolean;
}

export declare function closeDecision(
  code: number, reason: string | null | undefined,
  context: { welcomed: boolean; tokenRefreshable: boolean }): CloseDecision;
/** Delay in ms of reconnect attempt `attempt` (0-based) for `r` in [0, 1). */
export declare function backoffDelay(attempt: number, r: number, base?: number, cap?: number): number;
/** Bytes of `value` as compact UTF-8 JSON: what the relay measures. */
export declare function jsonBytes(value: unknown): number;

export interface FitResult {
  messages: ChatMessage[];
  /** How many messages were left out (oldest first). */
  dropped: number;
  /** False: even the last message alone is too large (`messages` is then empty). */
  fits: boolean;
  frameBytes: number;
}

/** The newest part of a conversation the relay takes in one `start` (its welcome.limits). */
export declare function fitMessages(
  messages: ChatMessage[], limits?: Partial<Limits>,
  options?: { model?: string; tools?: Tool[]; tool_choice?: ToolChoice; params?: Params; maxFrameBytes?: number },
): FitResult;

// ------------------------------------------------------------------ errors

export type StreamErrorCode =
  | "connection_lost" | "client_closed" | "duplicate_id" | "frame_too_large"
  | "unknown_stream" | "stream_lost" | "stream_taken_over" | "token_callback_failed" | "cannot_open"
  | (string & {});

/** A stream that did not end with a `finish` (refused, lost, taken over, client closed). */
export declare class StreamError extends Error {
  constructor(message: string, fields?: {
    code?: StreamErrorCode; id?: string | null; partialText?: string; frame?: ErrorFrame | null;
    closeCode?: number | null;
  });
  readonly name: "StreamError";
  code: StreamErrorCode;
  id: string | null;
  /** The text received before the failure. */
  partialText: string;
  /** The relay's `error` frame, when it sent one. */
  frame: ErrorFrame | null;
  closeCode: number | null;
}

export type RelayClientErrorCode = "token_callback_failed" | "cannot_open" | "no_websocket";

/** A failure on this side, where the relay was never reached (so no close code). */
export declare class RelayClientError extends Error {
  constructor(message: string, fields?: { code?: RelayClientErrorCode; cause?: unknown });
  readonly name: "RelayClientError";
  code: RelayClientErrorCode;
}

// ------------------------------------------------------------------ client and streams

export interface ToolCallState {
  index: number;
  callId: string;
  name: string;
  arguments: string;
  complete: boolean;
}

export type StreamStatus = "pending" | "streaming" | "resuming" | FinishStatus | "error";

/** One stream: an async iterator of its frames, with live state. */
export declare class RelayStream implements AsyncIterableIterator<StreamFrame> {
  readonly client: RelayClient;
  readonly id: string;
  readonly model: string;
  text: string;
  reasoning: string;
  refusal: string;
  toolCalls: ToolCallState[];
  usage: Usage | null;
  finish: FinishFrame | null;
  status: StreamStatus;
  streamKey: string | null;
  lastSeq: number;
  seqs: number[];
  framesDelivered: number;
  resumes: number;
  lastResume: { afterSeq: number; closeCode: number } | null;
  startedAt: number | null;
  firstTokenAt: number | null;
  /** ms from `start` sent to the first token, reasoning or tool-call frame. */
  ttft: number | null;
  error: StreamError | RelayClientError | null;
  /** Resolves with the `finish` frame; rejects with StreamError (or RelayClientError). */
  readonly done: Promise<FinishFrame>;
  readonly finished: boolean;
  /** Sends `cancel`; `done` then resolves with the `cancelled` finish. */
  cancel(): void;
  [Symbol.asyncIterator](): RelayStream;
  next(): Promise<IteratorResult<StreamFrame, undefined>>;
  /** Leaving a `for await` early cancels the stream. */
  return(): Promise<IteratorResult<StreamFrame, undefined>>;
}

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface StateDetail {
  state: ConnectionState;
  code?: number;
  reason?: string;
  meaning?: string;
  retryable?: boolean;
  attempt?: number;
  delay?: number;
  sessionId?: string | null;
  models?: string[];
  reconnected?: boolean;
  error?: RelayClientError;
}

/**
 * A WebSocket constructor: the browser's (global) or the `ws` package's. The client calls
 * `new WebSocket(url, ["llm-relay.v1"])` and uses the standard onopen/onmessage/onclose/
 * onerror, send and close.
 */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => object;

export interface RelayClientOptions {
  /** A token, or a function called before every connect (a fresh token on reconnect). */
  token?: string | (() => string | Promise<string>);
  clientName?: string;
  clientVersion?: string;
  /** ms between app-level pings (0 = none). */
  pingInterval?: number;
  /** ms without a pong before the connection counts as dead. */
  pingTimeout?: number;
  reconnect?: boolean;
  /** Reconnect attempts after one loss before giving up (default: the policy's 8;
   * `Infinity`: never give up on retryable closes). */
  maxRetries?: number;
  backoffBase?: number;
  backoffMax?: number;
  /** A WebSocket constructor, e.g. `(await import("ws")).WebSocket` on Node 20; default: the global one. */
  WebSocket?: WebSocketConstructor;
}

/** A connection to a relay that survives drops: reconnect with backoff, resume of streams. */
export declare class RelayClient extends EventTarget {
  /** Connects and resolves after the first `welcome`. */
  static connect(url?: string, options?: RelayClientOptions): Promise<RelayClient>;
  /** Throws RelayClientError `no_websocket` when there is no WebSocket implementation. */
  constructor(url?: string, options?: RelayClientOptions);
  readonly url: string;
  readonly options: Readonly<RelayClientOptions>;
  state: ConnectionState;
  welcome: WelcomeFrame | null;
  models: string[];
  limits: Partial<Limits>;
  sessionId: string | null;
  onstate: ((state: ConnectionState, detail: StateDetail) => void) | null;
  /** Every parsed frame, known or not (debugging). */
  onframe: ((frame: { type: string; [field: string]: unknown }) => void) | null;
  lastClose: { code: number; reason: string } | null;
  lastError: RelayClientError | null;
  /** Resolves (with this client) after the first `welcome`. */
  readonly ready: Promise<RelayClient>;
  /** Start a stream (throws StreamError `client_closed` once the client is closed). */
  start(options: StartOptions): RelayStream;
  /** Watch a stream started elsewhere by its `stream_key`, as a viewer (throws StreamError
   * `client_closed` once the client is closed). */
  watch(streamKey: string, options?: WatchOptions): RelayStream;
  /** While `reconnecting`: try now instead of after the backoff delay; false when no
   * attempt is waiting. */
  reconnectNow(): boolean;
  /** Streams that have not ended yet. */
  readonly streams: RelayStream[];
  /** Close for good: no reconnect; unfinished streams reject with `client_closed`. */
  close(code?: number, reason?: string): void;
  /** Send an app-level ping now. */
  ping(): void;
}
