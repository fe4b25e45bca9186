"""Put this folder on PYTHONPATH and every Python process imports fork_poison at start: a
forked child of any of them fails as soon as it runs torch compute (see fork_poison.py)."""

import fork_poison  # noqa: F401
