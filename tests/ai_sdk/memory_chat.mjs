// The AI SDK's AbstractChat (the core useChat wraps) over messages kept in
// memory, as the checks here drive it outside React; `chat.memory.messages`
// is what the chat holds.
import { AbstractChat } from "ai";

class MemoryState {
  constructor() {
    this.messages = [];
    this.status = "ready";
    this.error = undefined;
  }
  pushMessage(message) { this.messages = this.messages.concat(message); }
  popMessage() { this.messages = this.messages.slice(0, -1); }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  }
  snapshot(value) { return structuredClone(value); }
}

export class Chat extends AbstractChat {
  constructor(options) {
    const state = new MemoryState();
    super({ ...options, state });
    this.memory = state;
  }
}
