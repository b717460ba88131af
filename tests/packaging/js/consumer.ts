// A user's strict TypeScript program against the installed llm-relay-client tarball, run on
// Node with the `ws` package injected (Node 20 has no global WebSocket). Prints one JSON line.
import { WebSocket } from "ws";
import {
  PROTOCOL, RelayClient, StreamError, isRetryable,
  type FinishFrame, type RelayStream, type StreamFrame,
} from "llm-relay-client";
import POLICY from "llm-relay-client/client-policy.js";

const url = process.argv[2];
if (!url) throw new Error("usage: node consumer.js WS_URL");

const client: RelayClient = await RelayClient.connect(url, { WebSocket, pingInterval: 0 });
const stream: RelayStream = client.start({
  model: client.models[0] ?? "demo",
  messages: [{ role: "user", content: "hello from TypeScript" }],
});
let text = "";
const types: StreamFrame["type"][] = [];
for await (const frame of stream) {
  types.push(frame.type);
  if (frame.type === "token") text += frame.text; // narrowed to TokenFrame: text is a string
}
const finish: FinishFrame = await stream.done;

// The types are real, not `any`: tsc must reject this line (else the directive itself fails).
// @ts-expect-error a stream's text is a string
const wrong: number = stream.text;
void wrong;

let refused: string | null = null;
try {
  await client.start({ model: "no-such-model", messages: [{ role: "user", content: "x" }] }).done;
} catch (err) {
  if (err instanceof StreamError) refused = err.code;
}
client.close();

console.log(JSON.stringify({
  protocol: PROTOCOL, text, types, status: finish.status, totalTokens: finish.usage.total_tokens,
  refused, maxAttempts: POLICY.backoff.max_attempts, retries1006: isRetryable(1006),
}));
