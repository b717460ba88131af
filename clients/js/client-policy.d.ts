// Types of client-policy.js, the tables generated from the protocol package's client_policy
// module (`python -m llm_relay_protocol.client_policy --write`). Hand-written: the shape, not the values.

export interface ClientPolicy {
  readonly backoff: {
    readonly base_ms: number;
    readonly cap_ms: number;
    readonly factor: number;
    readonly jitter_max: number;
    readonly jitter_min: number;
    readonly max_attempts: number | null;
  };
  readonly close_codes: Readonly<Record<string, { readonly meaning: string; readonly name: string; readonly retryable: boolean }>>;
  readonly connection_lost_code: string;
  readonly frames: {
    readonly client: Readonly<Record<string, { readonly optional: readonly string[]; readonly required: readonly string[] }>>;
    readonly client_types: readonly string[];
    readonly server_types: readonly string[];
    readonly stream_types: readonly string[];
  };
  readonly local_cancel_finish: Readonly<Record<string, unknown>>;
  readonly recent_seqs_kept: number;
  readonly taken_over_code: string;
  readonly token_refresh: {
    readonly close_code: number;
    readonly reason: string;
    readonly requires_token_function: boolean;
    readonly requires_welcome: boolean;
    readonly resend_unanswered_starts: boolean;
  };
  readonly [table: string]: unknown;
}

declare const POLICY: ClientPolicy;
export default POLICY;
