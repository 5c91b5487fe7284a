"""Conversation and message history routes. Thin: parse, call, serialise."""
from __future__ import annotations

import uuid

from flask import g

from ..chat_schemas import UIMessagePageSchema
from ..db.extensions import db
from ..schemas import (
    ConversationListQuerySchema,
    ConversationPageSchema,
    ConversationPatchSchema,
    ConversationSchema,
    FeedbackRequestSchema,
    MessagePageQuerySchema,
    MessagePageSchema,
    MessageSchema,
)
from ..services import conversations
from .bodies import json_body, query_args
from .guards import user_blueprint

bp = user_blueprint("conversations", __name__)

conversation_schema = ConversationSchema()
conversation_page_schema = ConversationPageSchema()
message_page_schema = MessagePageSchema()
ui_message_page_schema = UIMessagePageSchema()
message_schema = MessageSchema()


@bp.get("/conversations")
def list_conversations():
    """The user's conversations (archived ones with archived=true), pinned
    first, then most recently updated first; with `q`, only those holding
    every word of it, each with a snippet."""
    args = query_args(ConversationListQuerySchema())
    page, next_cursor = conversations.list_conversations(db.session, g.user_id, args["limit"], args["cursor"],
                                                         args["archived"], args["q"])
    return conversation_page_schema.dump({"data": page, "next_cursor": next_cursor})


@bp.get("/conversations/<uuid:conversation_id>")
def get_conversation(conversation_id: uuid.UUID):
    return conversation_schema.dump(conversations.get_conversation(db.session, g.user_id, conversation_id))


@bp.patch("/conversations/<uuid:conversation_id>")
def update_conversation(conversation_id: uuid.UUID):
    """Rename, archive or pin (any of them at once)."""
    changes = json_body(ConversationPatchSchema())
    return conversation_schema.dump(conversations.update_conversation(db.session, g.user_id, conversation_id, changes))


@bp.post("/conversations/<uuid:conversation_id>/stop")
def stop(conversation_id: uuid.UUID):
    """Stop the reply the conversation is producing, whichever instance produces
    it: within CHAT_STREAM_FLUSH_S and a round trip its call to the assistant
    is closed, the reply keeps the text produced so far (`stopped`), and every
    stream of it ends with `abort`."""
    stopped = conversations.stop(db.session, g.user_id, conversation_id)
    return {"stopped": stopped is not None, "assistant_message_id": stopped}


@bp.delete("/conversations/<uuid:conversation_id>")
def delete_conversation(conversation_id: uuid.UUID):
    conversations.delete_conversation(db.session, g.user_id, conversation_id)
    return "", 204


@bp.get("/conversations/<uuid:conversation_id>/messages")
def list_messages(conversation_id: uuid.UUID):
    """A page of the conversation's messages, oldest first unless order=desc."""
    args = query_args(MessagePageQuerySchema())
    page, next_cursor = conversations.list_messages(db.session, g.user_id, conversation_id, args["limit"],
                                                    args["cursor"], args["order"],
                                                    superseded=args["include"] == "superseded")
    schema = ui_message_page_schema if args["format"] == "ui" else message_page_schema
    return schema.dump({"data": page, "next_cursor": next_cursor})


@bp.put("/conversations/<uuid:conversation_id>/messages/<bigint:message_id>/feedback")
def give_feedback(conversation_id: uuid.UUID, message_id: int):
    """The user's rating (up, down or null) and comment on an assistant message."""
    body = json_body(FeedbackRequestSchema())
    message = conversations.give_feedback(db.session, g.user_id, conversation_id, message_id, body["rating"],
                                          body["comment"])
    return message_schema.dump(message)
