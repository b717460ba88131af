// Validates UIMessageChunks with the `ai` package's own schema (uiMessageChunkSchema), the
// one WebSocketChatTransport applies to every chunk it receives. Reads a JSON array of
// chunks on stdin; prints a JSON array of {index, ok, error?}. Run by
// tests/relay/test_aisdk_transport.py::test_every_mapped_chunk_is_valid_for_the_ai_package.
import { asSchema, uiMessageChunkSchema } from 'ai';

let input = '';
for await (const part of process.stdin) input += part;
const schema = asSchema(uiMessageChunkSchema);
const results = [];
for (const [index, chunk] of JSON.parse(input).entries()) {
  const result = await schema.validate(chunk);
  results.push(result.success ? { index, ok: true } : { index, ok: false, error: String(result.error).slice(0, 400) });
}
process.stdout.write(JSON.stringify(results));
