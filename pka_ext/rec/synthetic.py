"""Built-in synthetic interaction data, so that training and evaluation run without data files.

The generator is a "chain process" in which the next item depends on which item is the most recent
one and on which item came two steps before it, so a sequential model that knows the order and the
relative positions of its inputs can beat one that sees the history as a bag of items.

Structure (drawn once from ``numpy.random.default_rng([seed, 0])``), over items ``1..N``:

* **Chains.** A random permutation of the N items is cut into ``K`` contiguous pieces of near-equal
  length (``numpy.array_split``); each piece is a cycle. ``succ(i)`` is the item after ``i`` in its
  chain, and the last item of a chain is followed by the first. Every item is on exactly one chain.
* **Lag-2 chain.** A second, independent random permutation of all N items, closed into one cycle of
  length N; ``succ2(i)`` is the item after ``i`` on it. It has no fixed points.
* **Popularity.** A third random permutation ranks the items; the item of rank ``r = 1..N`` has
  probability ``r**-zipf_a / sum_k k**-zipf_a`` (Zipf).

Sequences (drawn from ``numpy.random.default_rng([seed, 1])``), for each user independently:

1. The length ``L`` is uniform on ``min_len..max_len``.
2. The first item ``x_1`` is a uniformly chosen position on a uniformly chosen chain.
3. For ``t = 1 .. L-1`` the next item ``x_{t+1}`` is

   * ``succ(x_t)`` (follow the chain from the most recent item) with probability ``p_next``,
   * ``succ2(x_{t-1})`` (the lag-2 successor of the item two steps back) with probability
     ``p_lag2``; at ``t = 1`` there is no such item and ``succ(x_1)`` is used instead,
   * a jump to an item drawn from the Zipf popularity with probability ``1 - p_next - p_lag2``.

4. Timestamps are ``tau + (0, 1, ..., L-1)`` with a per-user start ``tau`` uniform on the integers
   ``0 .. 2*max_len - 1``, so users overlap in time and a global temporal split leaves most held-out
   users with some training history.

Hence, over the transitions with ``t >= 2``, the fraction with ``x_{t+1} = succ(x_t)`` is ``p_next``
and the fraction with ``x_{t+1} = succ2(x_{t-1})`` is ``p_lag2``, each up to chance coincidences
between the branches (of order ``1/N`` plus the jump branch hitting the right item); with the
defaults that is about 0.70 and 0.15. Original user and item ids are the strings ``"1".."U"`` and
``"1".."N"``, equal to the remapped ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pka_ext.modules import check_sizes, int_at_least
from pka_ext.rec.data import Interactions

__all__ = ["ChainProcess", "make_synthetic"]


@dataclass(frozen=True)
class ChainProcess:
    """The fixed structure of the chain process (see the module docstring).

    Attributes
    ----------
    chains : list of np.ndarray
        The item cycles; ``succ`` follows each array and wraps around.
    successor : np.ndarray
        int64 ``[N + 1]``: ``successor[i] = succ(i)``; entry 0 (padding) is 0.
    lag2_successor : np.ndarray
        int64 ``[N + 1]``: ``lag2_successor[i] = succ2(i)``; entry 0 is 0.
    popularity : np.ndarray
        float64 ``[N + 1]``: jump probability of each item; entry 0 is 0.
    p_next, p_lag2 : float
        Probabilities of the chain step and of the lag-2 step.
    """

    chains: list[np.ndarray]
    successor: np.ndarray
    lag2_successor: np.ndarray
    popularity: np.ndarray
    p_next: float
    p_lag2: float

    @property
    def num_items(self) -> int:
        """Number of items N."""
        return len(self.successor) - 1

    @classmethod
    def draw(cls, num_items: int, seed: int = 0, *, num_chains: int | None = None,
             p_next: float = 0.7, p_lag2: float = 0.15, zipf_a: float = 1.0) -> ChainProcess:
        """Draw the structure for ``seed``.

        Parameters
        ----------
        num_items : int
            N, at least 2.
        seed : int
            Seeds ``numpy.random.default_rng([seed, 0])``.
        num_chains : int, optional
            K, in ``1..N // 2`` so that every chain has at least 2 items; default
            ``min(20, N // 2)``.
        p_next, p_lag2 : float
            Step probabilities; both >= 0 with ``p_next + p_lag2 <= 1``.
        zipf_a : float
            Zipf exponent of the jump distribution, >= 0 (0 is uniform).
        """
        if not int_at_least(num_items, 2):
            raise ValueError(f"num_items must be an integer >= 2, got {num_items!r}")
        if num_chains is None:
            num_chains = min(20, num_items // 2)
        if not int_at_least(num_chains) or num_chains > num_items // 2:
            raise ValueError(f"num_chains must lie in 1..num_items // 2 = {num_items // 2}, "
                             f"got {num_chains!r}")
        # Written so that NaN, which fails every comparison, is refused too.
        if not (p_next >= 0 and p_lag2 >= 0 and p_next + p_lag2 <= 1):
            raise ValueError(f"need p_next >= 0, p_lag2 >= 0 and p_next + p_lag2 <= 1, got "
                             f"p_next={p_next}, p_lag2={p_lag2}")
        if not zipf_a >= 0:
            raise ValueError(f"zipf_a must be >= 0, got {zipf_a}")
        rng = np.random.default_rng([seed, 0])
        items = np.arange(1, num_items + 1, dtype=np.int64)

        chains = np.array_split(rng.permutation(items), num_chains)
        successor = np.zeros(num_items + 1, dtype=np.int64)
        for chain in chains:
            successor[chain] = np.roll(chain, -1)

        cycle = rng.permutation(items)
        lag2_successor = np.zeros(num_items + 1, dtype=np.int64)
        lag2_successor[cycle] = np.roll(cycle, -1)

        ranked = rng.permutation(items)
        weights = np.arange(1, num_items + 1, dtype=np.float64) ** -zipf_a
        popularity = np.zeros(num_items + 1)
        popularity[ranked] = weights / weights.sum()
        return cls(list(chains), successor, lag2_successor, popularity, p_next, p_lag2)

    def sample(self, num_users: int, min_len: int, max_len: int, seed: int = 0) -> Interactions:
        """Draw one sequence per user (steps 1-4 of the module docstring).

        Parameters
        ----------
        num_users : int
            U, at least 1.
        min_len, max_len : int
            Sequence length bounds, ``1 <= min_len <= max_len``.
        seed : int
            Seeds ``numpy.random.default_rng([seed, 1])``.
        """
        check_sizes(num_users=num_users)
        check_sizes(min_len=min_len, max_len=max_len)
        if not min_len <= max_len:
            raise ValueError(f"need min_len <= max_len, got min_len={min_len}, "
                             f"max_len={max_len}")
        rng = np.random.default_rng([seed, 1])
        n = self.num_items
        lengths = rng.integers(min_len, max_len + 1, size=num_users)
        chain_of = rng.integers(0, len(self.chains), size=num_users)
        x = np.zeros((num_users, max_len), dtype=np.int64)
        x[:, 0] = [self.chains[c][rng.integers(len(self.chains[c]))] for c in chain_of]
        # All users draw every step, also past their length, so one vectorised pass serves all.
        for t in range(1, max_len):
            u = rng.random(num_users)
            jump = rng.choice(n + 1, size=num_users, p=self.popularity)
            lag2 = self.lag2_successor[x[:, t - 2]] if t >= 2 else self.successor[x[:, 0]]
            x[:, t] = np.where(u < self.p_next, self.successor[x[:, t - 1]],
                               np.where(u < self.p_next + self.p_lag2, lag2, jump))
        start = rng.integers(0, 2 * max_len, size=num_users)
        sequences = [x[i, :L].copy() for i, L in enumerate(lengths)]
        timestamps = [(s + np.arange(L)).astype(np.float64) for s, L in zip(start, lengths)]
        return Interactions(sequences, timestamps, [str(i) for i in range(1, n + 1)],
                            [str(u) for u in range(1, num_users + 1)])


def make_synthetic(num_users: int = 2000, num_items: int = 500, min_len: int = 8,
                   max_len: int = 40, seed: int = 0, *, num_chains: int | None = None,
                   p_next: float = 0.7, p_lag2: float = 0.15,
                   zipf_a: float = 1.0) -> Interactions:
    """The built-in data set: ``ChainProcess.draw(...).sample(...)`` for one seed.

    Parameters
    ----------
    num_users, num_items : int
        U and N.
    min_len, max_len : int
        Sequence length bounds.
    seed : int
        Fixes both the structure and the sequences; the same arguments give the same data.
    num_chains, p_next, p_lag2, zipf_a
        See :meth:`ChainProcess.draw`.

    Returns
    -------
    Interactions
        With timestamps; ids ``"1".."U"`` and ``"1".."N"``.
    """
    process = ChainProcess.draw(num_items, seed, num_chains=num_chains, p_next=p_next,
                                p_lag2=p_lag2, zipf_a=zipf_a)
    return process.sample(num_users, min_len, max_len, seed)
