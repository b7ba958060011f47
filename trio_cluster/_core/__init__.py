"""Sans-IO core of trio_cluster.

Pure functions and small state machines: shard hashing, assignment, ownership,
mailbox accounting, retry schedules, configuration, ids and cron schedules.
Nothing here imports trio, psycopg, trio_websocket, msgpack, ``time`` or
``random``; the clock and randomness are arguments. A test enforces this.
"""
