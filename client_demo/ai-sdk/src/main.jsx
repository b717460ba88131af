// useChat (React) over the AI SDK's WebSocketChatTransport, talking to llm-relay's /ai-sdk.
// Built into dist/app.js by `npm run build` (esbuild); the relay serves this folder at
// /examples/ai-sdk/. The chat id and messages live in localStorage so a reload resumes the
// answer that was streaming (useChat's `resume: true` sends a `resume` frame on mount).
import React, { useMemo, useState } from 'react';
import { createRoot } from 'react-dom/client';
import { useChat } from '@ai-sdk/react';
import { WebSocketChatTransport } from 'ai';

const STORE = 'llm-relay-ai-sdk-example';

function loadSaved() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) ?? 'null');
    if (saved && typeof saved.chatId === 'string') return saved;
  } catch { /* a corrupt entry starts a new chat */ }
  return { chatId: crypto.randomUUID(), messages: [] };
}

function App() {
  const saved = useMemo(loadSaved, []);
  const transport = useMemo(() => new WebSocketChatTransport({
    url: new URL('/ai-sdk', location.href).href,
    body: { model: new URLSearchParams(location.search).get('model') ?? undefined },
  }), []);
  const { messages, sendMessage, status, stop, error } = useChat({
    id: saved.chatId,
    messages: saved.messages,
    transport,
    resume: true,
    onFinish: () => {},
  });
  const [input, setInput] = useState('');

  // Keep the conversation so a reload shows it and resumes the streaming answer.
  React.useEffect(() => {
    localStorage.setItem(STORE, JSON.stringify({ chatId: saved.chatId, messages }));
  }, [messages, saved.chatId]);

  const busy = status === 'submitted' || status === 'streaming';
  return (
    <main>
      <h1>useChat over llm-relay</h1>
      <ol id="messages">
        {messages.map(m => (
          <li key={m.id} className={`message ${m.role}`} data-role={m.role}>
            {m.parts.map((p, i) => p.type === 'text'
              ? <span key={i} className="text">{p.text}</span>
              : null)}
          </li>
        ))}
      </ol>
      {error && <p id="error" role="alert">{error.message}</p>}
      <form onSubmit={e => {
        e.preventDefault();
        if (busy || !input.trim()) return;
        sendMessage({ text: input });
        setInput('');
      }}>
        <input id="prompt" value={input} onChange={e => setInput(e.target.value)}
               placeholder="Ask something" autoFocus />
        {busy
          ? <button id="stop" type="button" onClick={() => stop()}>Stop</button>
          : <button id="send" type="submit">Send</button>}
        <span id="status">{status}</span>
      </form>
    </main>
  );
}

createRoot(document.getElementById('root')).render(<App />);
