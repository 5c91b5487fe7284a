// The AI SDK's own client against the streaming chat endpoint, as a Next.js
// frontend on useChat runs it: AbstractChat (the core useChat wraps) with
// DefaultChatTransport, sending only the new message and the conversation id
// taken from the finish metadata. Prints what the client ended up with as JSON.
//
//   node chat_check.mjs <base url> <user id> <token> <message> [<message> ...]
import { DefaultChatTransport } from "ai";
import { Chat } from "./memory_chat.mjs";

const [api, userId, token, ...texts] = process.argv.slice(2);

let conversationId = null;
const errors = [];
const chat = new Chat({
  transport: new DefaultChatTransport({
    api: `${api}/api/${userId}/chat`,
    headers: () => ({ Authorization: `Bearer ${token}` }),
    prepareSendMessagesRequest: ({ messages }) => {
      const last = messages[messages.length - 1];
      const text = last.parts.map((part) => (part.type === "text" ? part.text : "")).join("");
      return { body: { message: text, conversation_id: conversationId, stream: true } };
    },
  }),
  onFinish: ({ message }) => {
    if (message.metadata?.conversation_id) conversationId = message.metadata.conversation_id;
  },
  onError: (error) => errors.push(String(error?.message ?? error)),
});

for (const text of texts) {
  await chat.sendMessage({ text });
}
console.log(JSON.stringify({
  status: chat.status,
  errors,
  conversationId,
  messages: chat.memory.messages.map((message) => ({
    role: message.role,
    id: message.id,
    metadata: message.metadata ?? null,
    parts: message.parts.map((part) => ({ type: part.type, text: part.text ?? null, state: part.state ?? null,
                                          toolCallId: part.toolCallId ?? null, input: part.input ?? null })),
  })),
}));
