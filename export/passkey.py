"""The PassKey task: a key placed in the first block, asked for at the end of block N.

Token ids (vocabulary of 32; the same layout as famc's `src/eval/passkey.rs`):

    0       BOS
    1       KEY marker   ("the pass key is")
    2       QUERY marker ("what is the pass key?")
    3..18   the 16 key values
    19..31  13 filler tokens

A sample at distance N blocks (block length L) holds (N+1)·L tokens: BOS at 0, filler everywhere
else except KEY at a position p in [1, L-2] of block 0 followed by the key value at p+1, and QUERY
at the very last position (N+1)·L - 1, the end of block N. The answer is the key value: the model
must predict it at the QUERY position. Every block is full, so the state is carried through all
N blocks between the key and the question.

`eval_sample` draws samples from SplitMix64 exactly as famc's Rust generator does (same seed, same
samples); training draws from numpy for speed, in the same layout.
"""
import numpy as np

VOCAB = 32
BOS, KEY, QUERY = 0, 1, 2
KEY0, NUM_KEYS = 3, 16
FILLER0, NUM_FILLERS = 19, 13
MASK64 = (1 << 64) - 1


class SplitMix64:
    """famc's deterministic generator (src/eval/passkey.rs)."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next_u64() % n


def eval_sample(rng: SplitMix64, block_len: int, distance_blocks: int):
    """One sample: (ids, answer). Draw order: fillers for every position, then p, then the key."""
    n = (distance_blocks + 1) * block_len
    ids = [FILLER0 + rng.below(NUM_FILLERS) for _ in range(n)]
    p = 1 + rng.below(block_len - 2)
    key = KEY0 + rng.below(NUM_KEYS)
    ids[0] = BOS
    ids[p] = KEY
    ids[p + 1] = key
    ids[n - 1] = QUERY
    return ids, key


def eval_samples(seed: int, block_len: int, distance_blocks: int, count: int):
    rng = SplitMix64(seed)
    return [eval_sample(rng, block_len, distance_blocks) for _ in range(count)]


def train_batch(rng: np.random.Generator, batch: int, block_len: int, blocks: int):
    """A training batch of `blocks` blocks; sample i asks at the end of its own block N_i in
    [1, blocks-1] (tokens after the question are filler). Returns (ids [B, blocks·L],
    query positions [B], answers [B])."""
    L = block_len
    n = blocks * L
    ids = FILLER0 + rng.integers(0, NUM_FILLERS, size=(batch, n))
    rows = np.arange(batch)
    p = 1 + rng.integers(0, L - 2, size=batch)
    key = KEY0 + rng.integers(0, NUM_KEYS, size=batch)
    dist = rng.integers(1, blocks, size=batch)
    qpos = (dist + 1) * L - 1
    ids[:, 0] = BOS
    ids[rows, p] = KEY
    ids[rows, p + 1] = key
    ids[rows, qpos] = QUERY
    return ids, qpos, key
