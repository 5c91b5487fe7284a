"""Services: the domain operations, one transaction each, with no Flask:
the chat turn, idempotency, rate limits, conversations, tasks, the user's
data, retention and pagination."""
