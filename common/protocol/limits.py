"""Every bound and pattern of the protocol, in one place.

The wire decoders (:mod:`sottovoce.common.transport.wire`) enforce these on every field of
every message, in both directions; configs, policies and ledgers use the same patterns so
that what one side accepts the other can send. A value outside them is refused before it
reaches any code that could misuse it.
"""

from __future__ import annotations

import re

# -- identifiers -------------------------------------------------------------------------------
MAX_ID_LENGTH = 64  # task, run and holder ids
ID_PATTERN = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_LENGTH}}}")
SESSION_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,64}")
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
FINGERPRINT_REGEX = r"sha256:[0-9a-f]{64}"  # a model fingerprint, as a pattern string
FINGERPRINT_PATTERN = re.compile(FINGERPRINT_REGEX)
UINT64_MAX = 2**64 - 1  # seeds

# -- sizes -------------------------------------------------------------------------------------
MAX_LAMBDA = 64  # candidates in one task
MAX_NEW_STEPS = 100_000  # steps shipped in one task
MAX_BATCH_SIZE = 1_000_000
MAX_TEXT_LENGTH = 4096  # prompt template, patterns, policy values
MAX_LABEL_WORDS = 16
MAX_LABEL_WORD_LENGTH = 64
MAX_KL_PROMPTS = 128  # the divergence penalty's secret prompts (issue 11: at most 128)
MAX_NAME_LENGTH = 64  # algorithm name, record field names, policy keys
MAX_REASON_LENGTH = 512  # why a run finished
MAX_PATTERNS = 256
MAX_POLICY_ENTRIES = 64
MAX_LAST_K_BLOCKS = 65_536
MAX_COUNT = 2**40  # log versions, round indexes, max_rounds
# A subspace's x is allocated on the holder (float32): 2**24 coordinates are 64 MiB.
MAX_SUBSPACE_DIMENSION = 2**24
# Explicit coordinates (CMA's candidates and steps are delta vectors, not z(seed)): the
# largest parametrization they may move, and the delta floats one message may carry.
MAX_EXPLICIT_DIMENSION = 2048
MAX_DELTA_FLOATS = 1 << 19  # 2 MiB of float32 in one task or RunFinished
MAX_WAIT_MS = 600_000  # a PullTask's long-poll
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a task with MAX_NEW_STEPS steps is about 1.6 MB

# -- numbers -----------------------------------------------------------------------------------
MAX_ABS_SCALE = 1e3  # candidate scales and step coefficients (finite float32s)
MAX_KL_WEIGHT = 1e6  # the divergence penalty's weight (score units per nat)
MAX_BITS = 1e12  # bit budgets and totals
MAX_DEADLINE_UNIX = 1e11  # year ~5138: any larger "time" is garbage
FLOAT32_BITS = 32  # what an unquantized dp-scalar answer costs
MAX_QUANTIZATION_BITS = 16
MAX_CHOICE = 2**MAX_QUANTIZATION_BITS - 1  # best-of indexes (<= 64) and quantized levels
MAX_NOISE_MULTIPLIER = 1e6  # a DP spec's noise multiplier on the wire
MAX_EPSILON = 1e6  # a run's DP target (reported, never used in arithmetic by a holder)
# Randomized response at epsilon 64 keeps the truth with probability 1 - 1e-27: past it
# the mechanism is plain comparison in all but name, and exp() stays far from overflow.
MAX_RANDOMIZED_RESPONSE_EPSILON = 64.0
# Chunk votes: K chunks of a holder's records (a histogram of K votes, allocated per task)
# and the noise std on each count, in votes.
MAX_CHUNKS = 2**20
MAX_VOTE_NOISE = 1e6
MAX_KEEP_MARGIN = float(MAX_CHUNKS)  # votes; more than K votes always keeps the incumbent
