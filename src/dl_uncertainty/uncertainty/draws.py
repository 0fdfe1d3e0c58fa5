"""The rows and random draws of one forward call of the MC engine.

``_Layout`` says how a call's rows are laid out (``tc`` MC samples x ``nc`` examples) and draws the
noise of each MC sample, from its own seeded generator when answers must not depend on the batch.
``SampleCache`` keeps those seeded draws, so a server draws them once.
"""

from __future__ import annotations

import torch
from torch import nn

from dl_uncertainty.uncertainty.mc_plan import _DROPOUT, _Costs


class _Layout:
    """Rows of the current forward call: ``tc`` MC samples x ``nc`` examples, sample-major.

    A tensor whose leading dim is ``nc`` (and ``tc > 1``) is *shared*: the same for every MC
    sample, not yet widened.
    """

    def __init__(self, mode: str, costs: _Costs) -> None:
        self.mode = mode  # "repeat" | "lrt" | "auto"
        self.costs = costs
        self.tc = 1
        self.nc = 1
        self.seeds: list[int] | None = None  # per-row seeding: one generator seed per MC sample of the chunk
        self.device = torch.device("cpu")
        self._gens: list[torch.Generator | None] = []
        self._replay: list[list | None] = []  # per MC sample of the chunk: its cached draws, in draw order
        self._record: list[list] = []  # ... or the draws made now, in the same order
        self._pos: list[int] = []

    @property
    def seeded(self) -> bool:
        return self.seeds is not None

    def start(self, seeds: list[int] | None, device: torch.device, replay: list[list | None]) -> None:
        """A new forward call whose MC sample i draws from a generator seeded by ``seeds[i]``, or
        replays ``replay[i]`` (what that generator gave before, in draw order) when it is not None."""
        self.seeds, self.device = seeds, device
        n = len(seeds) if seeds is not None else 0
        self._gens, self._replay, self._record, self._pos = [None] * n, replay, [[] for _ in range(n)], [0] * n

    def recorded(self, i: int) -> list | None:
        """MC sample i's draws of the last forward call, when they were drawn rather than replayed."""
        return self._record[i] if self._replay[i] is None else None

    def sampled(self, i: int, make):
        """``make(generator)`` for MC sample i of the chunk: a sampled weight set or mask, drawn from
        sample i's own generator, or the identical tensor(s) replayed from the cache."""
        tape = self._replay[i]
        if tape is not None:
            self._pos[i] += 1
            return tape[self._pos[i] - 1]
        if self._gens[i] is None:
            self._gens[i] = torch.Generator(self.device).manual_seed(self.seeds[i])
        value = make(self._gens[i])
        self._record[i].append(value)
        return value

    def draw(self, fn, shape: tuple[int, ...], like: torch.Tensor, finish=None) -> torch.Tensor:
        """``finish(fn(...))`` (fn: torch.rand / torch.randn; finish: elementwise) of shape ``[tc, *shape]``;
        with per-row seeding, MC sample t's slice comes from its own generator, so it does not depend on
        the batch or the chunking."""
        kw = {"dtype": like.dtype, "device": like.device}
        if self.seeds is None:
            r = fn((self.tc, *shape), **kw)
            return r if finish is None else finish(r)

        def make(g: torch.Generator) -> torch.Tensor:
            r = fn(shape, generator=g, **kw)
            return r if finish is None else finish(r)

        return torch.stack([self.sampled(i, make) for i in range(self.tc)])

    def shared(self, t: torch.Tensor) -> bool:
        if self.tc == 1:
            return False
        if t.shape[0] == self.nc:
            return True
        if t.shape[0] == self.tc * self.nc:
            return False
        raise _LayoutError(f"unexpected batch dim {t.shape[0]} (nc={self.nc}, tc={self.tc})")

    def widen(self, t: torch.Tensor) -> torch.Tensor:
        if self.shared(t):
            return t.unsqueeze(0).expand(self.tc, *t.shape).reshape(self.tc * self.nc, *t.shape[1:])
        return t


class _LayoutError(RuntimeError):
    pass


class SampleCache:
    """The per-row-seeded draws (sampled weight sets, dropout masks) of one model, kept for reuse.

    With ``row_seed``, what MC sample t draws depends only on (row_seed, t), the model's parameters
    and the per-example input shape, never on the rows: a server can draw it once and replay it for
    every request. Replayed tensors are the very tensors drawn the first time, so answers with the
    cache equal answers without it, bit for bit. At most ``max_bytes`` are held: an MC sample whose
    draws do not fit is drawn anew on every call (a model too big for the cache is never cached).
    Any change to the model's parameters (or a dropout's p) empties the cache.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._tapes: dict[tuple, list] = {}
        self._stamp: tuple | None = None

    def __len__(self) -> int:  # MC samples held (per row seed and input shape)
        return len(self._tapes)

    def clear(self) -> None:
        self._tapes.clear()
        self.bytes = 0

    def check(self, model: nn.Module) -> None:
        """Empty the cache unless ``model`` and its parameters are those it was filled from."""
        stamp = (id(model), tuple((p.data_ptr(), p._version) for p in model.parameters()),
                 tuple(m.p for m in model.modules() if isinstance(m, _DROPOUT)))
        if stamp != self._stamp:
            self.clear()
            self._stamp = stamp

    def get(self, key: tuple) -> list | None:
        return self._tapes.get(key)

    def put(self, key: tuple, tape: list) -> None:
        size = sum(t.numel() * t.element_size() for entry in tape
                   for t in (entry if isinstance(entry, tuple) else (entry,)) if t is not None)
        if key not in self._tapes and self.bytes + size <= self.max_bytes:
            self._tapes[key] = tape
            self.bytes += size
