"""chat plane of the silent-monitoring gateway.

- :mod:`gateway.chat.log`: the durable per-conversation log (``ChatLog`` protocol,
  ``SqliteChatLog``: gap-free ``seq``, idempotent ``client_id``, trim, one writer thread).
- :mod:`gateway.chat.hub`: live fan-out, bounded per subscriber (``chat_reader_cap``).
- :mod:`gateway.chat.service`: ``ChatService`` (post with validation and rate limit, view
  filtering, end of a conversation, shutdown).
- :mod:`gateway.api.chat_ws`: the websocket protocol (``serve_chat_stream``).

Wiring in the app (control plane)::

    async def chat_ctx(app):
        chat = ChatService(settings, SqliteChatLog(settings.chat_path))
        app[CHAT] = chat
        yield
        await chat.close()                       # closes the log too

    async def chat_going_away(app):              # streams close 1001 at once (clients
        app[CHAT].go_away()                      # resume with after=); else shutdown
    app.on_shutdown.append(chat_going_away)      # waits for every open chat websocket
"""
