"""The central matchmaker: it queues waiting hosts and workers and forms groups (``docs/protocol.md``).

- :mod:`~crowdd.matchmaker.grouping`: the decisions, pure (queues, groups, open sessions);
- :mod:`~crowdd.matchmaker.bans`: who expelled whom;
- :mod:`~crowdd.matchmaker.server`: the asyncio server around them;
- :mod:`~crowdd.matchmaker.command`: ``crowdd matchmaker``;
- :mod:`~crowdd.matchmaker.client`: a node's side (register, hold a session open, report).
"""
