// The AI SDK's client with nothing customised, as useChat({ id, transport })
// runs it: AbstractChat with DefaultChatTransport({ api, headers }) and a chat
// id of its own; send, send, regenerate(), then an edit with
// sendMessage({ text, messageId }). After each step, the chat's messages and
// the server's ?format=ui page are printed side by side.
//
//   node use_chat_check.mjs <base url> <user id> <token>
import { DefaultChatTransport } from "ai";
import { Chat } from "./memory_chat.mjs";

const [base, userId, token] = process.argv.slice(2);
const headers = () => ({ Authorization: `Bearer ${token}` });

const id = crypto.randomUUID();
const errors = [];
const chat = new Chat({
  id,
  transport: new DefaultChatTransport({ api: `${base}/api/${userId}/chat`, headers }),
  onError: (error) => errors.push(String(error?.message ?? error)),
});

const shown = (messages) => messages.map((message) => ({
  id: message.id, role: message.role,
  text: message.parts.filter((part) => part.type === "text").map((part) => part.text).join(""),
}));
async function served() {
  const page = await fetch(`${base}/api/${userId}/conversations/${id}/messages?format=ui`, { headers: headers() });
  return shown((await page.json()).data);
}

const steps = [];
await chat.sendMessage({ text: "first question" });
steps.push({ step: "send", client: shown(chat.memory.messages), server: await served() });
await chat.sendMessage({ text: "second question" });
steps.push({ step: "send again", client: shown(chat.memory.messages), server: await served() });
await chat.regenerate();
steps.push({ step: "regenerate", client: shown(chat.memory.messages), server: await served() });
const edited = chat.memory.messages.find((message) => message.role === "user");
await chat.sendMessage({ text: "first question, edited", messageId: edited.id });
steps.push({ step: "edit", client: shown(chat.memory.messages), server: await served() });

console.log(JSON.stringify({ id, status: chat.status, errors, steps }));
