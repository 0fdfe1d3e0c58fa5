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
        self._step = 0  # draws made so far in this forward call (every MC sample draws in step)

    @property
    def seeded(self) -> bool:
        return self.seeds is not None

    def start(self, seeds: list[int] | None, device: torch.device, replay: list[list | None]) -> None:
        """A new forward call whose MC sample i draws from a generator seeded by ``seeds[i]``, or
        replays ``replay[i]`` (what that generator gave before, in draw order) when it is not None."""
        self.seeds, self.device = seeds, device
        n = len(seeds) if seeds is not None else 0
        self._gens, self._replay, self._record, self._step = [None] * n, replay, [[] for _ in range(n)], 0

    def recorded(self, i: int) -> list | None:
        """MC sample i's draws of the last forward call, when they were drawn rather than replayed."""
        return self._record[i] if self._replay[i] is None else None

    def stacked(self, make):
        """``make(generator)`` (a tensor, or a tuple of tensors and Nones) for every MC sample of the
        chunk, stacked along a new first dim: sample i's slice is drawn from its own generator or
        replayed from the cache. Samples recorded together are kept as slices of one stack, so when
        they are replayed together their stack is returned as it is, without a copy."""
        step, self._step = self._step, self._step + 1
        replay = [tape[step] if tape is not None else None for tape in self._replay]
        if all(r is not None for r in replay):
            whole = _one_stack(replay)
            if whole is not None:
                return whole
        parts = [r if r is not None else make(self._generator(i)) for i, r in enumerate(replay)]
        if isinstance(parts[0], tuple):
            stack = tuple(None if p is None else torch.stack([q[k] for q in parts])
                          for k, p in enumerate(parts[0]))
        else:
            stack = torch.stack(parts)
        for i, r in enumerate(replay):
            if r is None:  # the draw is kept as a view of the stack: one copy in memory
                self._record[i].append(tuple(None if s is None else s[i] for s in stack)
                                       if isinstance(stack, tuple) else stack[i])
        return stack

    def _generator(self, i: int) -> torch.Generator:
        if self._gens[i] is None:
            self._gens[i] = torch.Generator(self.device).manual_seed(self.seeds[i])
        return self._gens[i]

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

        return self.stacked(make)

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


def _one_stack(parts: list):
    """The stack(s) whose consecutive slices ``parts`` (one entry per MC sample) are, cut to them; else None."""
    if not isinstance(parts[0], tuple):
        return _slices_of(parts)
    stacks = tuple(None if first is None else _slices_of([p[k] for p in parts]) for k, first in enumerate(parts[0]))
    return None if any(s is None and f is not None for s, f in zip(stacks, parts[0], strict=True)) else stacks


def _slices_of(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The parts as one [n, ...] tensor when they lie back to back in one storage (slices of one stack)."""
    first = parts[0]
    if not first.is_contiguous():
        return None
    storage, step, origin = first.untyped_storage().data_ptr(), first.numel(), first.storage_offset()
    for i, p in enumerate(parts):
        if (p.untyped_storage().data_ptr() != storage or p.storage_offset() != origin + i * step
                or p.shape != first.shape or not p.is_contiguous()):
            return None
    return first.as_strided((len(parts), *first.shape), (step, *first.stride()), origin)


def _nbytes(tape: list) -> int:
    return sum(t.numel() * t.element_size() for entry in tape
               for t in (entry if isinstance(entry, tuple) else (entry,)) if t is not None)


def _copied(tape: list) -> list:
    """The draws with storage of their own (a slice would keep its whole stack alive)."""
    return [tuple(None if t is None else t.clone() for t in e) if isinstance(e, tuple) else e.clone() for e in tape]


class _LayoutError(RuntimeError):
    pass


class SampleCache:
    """The per-row-seeded draws (Bayesian noise vectors or weight sets, dropout masks) of one model,
    kept for reuse.

    With ``row_seed``, what MC sample t draws depends only on (row_seed, t), the model's parameters
    and the per-example input shape, never on the rows: a server can draw it once and replay it for
    every request. Replayed tensors are the very tensors drawn the first time, so answers with the
    cache equal answers without it, bit for bit. At most ``max_bytes`` are held: an MC sample whose
    draws do not fit is drawn anew on every call (a model too big for the cache is never cached).
    Any change to the model's parameters (or a dropout's p) empties the cache. The draws of the MC
    samples of one forward call are held as one stack per layer (``[T, ...]``), which a call with the
    same samples gets back without a copy; the bytes counted are the bytes held.
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

    def put_all(self, tapes: list[tuple[tuple, list | None]]) -> None:
        """Keep what fits of one forward call's draws: (key, draws in draw order, or None where the sample
        was replayed) for each of its MC samples. The draws are slices of the call's stacks; they stay
        slices (one stack per layer, replayed without a copy) when every sample of the call is kept, and
        are copied out otherwise, so that the bytes counted are the bytes held."""
        sizes = [0 if tape is None else _nbytes(tape) for _, tape in tapes]
        if all(tape for _, tape in tapes) and self.bytes + sum(sizes) <= self.max_bytes:
            for (key, tape), size in zip(tapes, sizes, strict=True):
                if key not in self._tapes:
                    self._tapes[key] = tape
                    self.bytes += size
            return
        for (key, tape), size in zip(tapes, sizes, strict=True):
            if tape and key not in self._tapes and self.bytes + size <= self.max_bytes:
                self._tapes[key] = _copied(tape)
                self.bytes += size
