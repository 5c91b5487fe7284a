// The AI SDK's own client following and stopping a reply, as useChat does it:
// a second chat object (useChat({ id, resume: true }) after a reload) calls
// resumeStream() while the first one's reply streams; then a third chat's
// stop() goes with a call to the stop route. Prints what each chat ended up with.
//
//   node resume_check.mjs <base url> <user id> <token>
import { DefaultChatTransport } from "ai";
import { Chat } from "./memory_chat.mjs";

const [base, userId, token] = process.argv.slice(2);
const api = `${base}/api/${userId}/chat`;
const headers = () => ({ Authorization: `Bearer ${token}` });

// The native body: the new message only; the conversation id comes with the stream's `start`.
const nativeTransport = new DefaultChatTransport({
  api, headers,
  prepareSendMessagesRequest: ({ messages }) => {
    const last = messages[messages.length - 1];
    return { body: { message: last.parts.map((part) => part.text ?? "").join(""), stream: true } };
  },
});

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const text = (chat) => {
  const last = chat.memory.messages.at(-1);
  return last?.role === "assistant" ? last.parts.map((part) => part.text ?? "").join("") : "";
};
const conversationOf = (chat) => chat.memory.messages.at(-1)?.metadata?.conversation_id;
async function untilStreaming(chat) {
  while (!text(chat)) await sleep(20);
}
const summary = (chat) => ({
  status: chat.status,
  messages: chat.memory.messages.map((message) => ({ id: message.id, role: message.role,
    text: message.parts.map((part) => part.text ?? "").join("") })),
});

const first = new Chat({ transport: nativeTransport });
const sent = first.sendMessage({ text: "tell me slowly" });
await untilStreaming(first);
const reloaded = new Chat({ id: conversationOf(first), transport: new DefaultChatTransport({ api, headers }) });
await reloaded.resumeStream();
await sent;

const stopped = new Chat({ transport: nativeTransport });
const stopping = stopped.sendMessage({ text: "stop me" });
await untilStreaming(stopped);
const conversation = conversationOf(stopped);
stopped.stop();
const route = await fetch(`${base}/api/${userId}/conversations/${conversation}/stop`,
                          { method: "POST", headers: headers() });
await stopping;
const listed = await fetch(`${base}/api/${userId}/conversations/${conversation}/messages`, { headers: headers() });

console.log(JSON.stringify({
  first: summary(first), reloaded: summary(reloaded), stopped: summary(stopped),
  stopRoute: await route.json(), stoppedMessages: (await listed.json()).data,
}));
