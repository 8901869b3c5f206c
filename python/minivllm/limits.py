"""What the C++ core's fields hold, which every check on user input is held against."""

from __future__ import annotations

# What the C++ core's fields hold: token ids, positions, slots and lengths are int32, max_tokens
# and sequence ids int64.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# Seeds (the engine's, a request's) are unsigned 64-bit, as torch generators and the core take them.
SEED_LIMIT = 2**64
