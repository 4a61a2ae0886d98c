"""The running batch's KV cache: dense, left-padded, pre-allocated and written in place.

Per layer, keys and values live in buffers of shape ``[B_cap, H_kv, L_cap, D]``. The
live part is rows ``[0, B)`` and columns ``[start, end)``; ``mask[b, l]`` is True where
row ``b`` holds a real token at column ``l``::

               start                 end        L_cap
    row 0      | pad pad  t   t   t   |  free  |
    row 1      |  t   t   t   t   t   |  free  |     mask: 0 0 1 1 1 / 1 1 1 1 1
    row B-1    | pad  t   t   t   t   |  free  |

Invariants
- Each row's tokens are contiguous and end at column ``end - 1`` (left padding).
- A decode step writes one column (``end``) for every row, in place: no copy of the cache.
- Removing a row moves the last row into its slot (O(L) per layer, not O(B*L)); trimming
  leading all-padding columns only advances ``start``.
- Copies of the whole live window happen only when capacity runs out (amortised: buffers
  grow to ``GROWTH`` times the need) or when the padding policy asks for compaction.
- Every slot of rows ``[0, B)`` inside ``[start, end)`` holds a finite value, masked or not
  (attention multiplies masked values by zero, and 0 * NaN is NaN); slots outside are
  never read, so buffers are allocated uninitialised.
- With no rows left, the buffers are released, so idle memory returns to its baseline.

``update`` follows the ``transformers`` cache protocol (``update(k, v, layer_idx)``), so the
model's own forward writes into the buffers; the attention mask is passed as a ready 4-D
boolean mask ``[B, 1, 1, L]``, which ``transformers`` uses as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GROWTH = 1.5  # buffers grow (and shrink) to this multiple of the rows and columns needed
MIN_ROWS, MIN_COLS = 4, 64


@dataclass
class RowKV:
    """One row's K/V, without padding: per layer ``[H_kv, T, D]`` tensors (T = its tokens)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1]

    def to(self, device: torch.device | str) -> "RowKV":
        return RowKV([k.to(device) for k in self.keys], [v.to(device) for v in self.values])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class BatchKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []  # per layer [B_cap, H_kv, L_cap, D]
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [B_cap, L_cap]
        self.rows = 0  # B
        self.start = 0
        self.end = 0
        self._write_col: int | None = None  # the column a decode step writes, set by begin_step
        self._step_rows = 0  # rows in this decode step's forward pass, dummy rows included
        self.poison: float | None = None  # tests fill new buffers with NaN to prove unread slots stay unread

    # --- sizes ---------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Live columns L = end - start."""
        return self.end - self.start

    @property
    def row_capacity(self) -> int:
        return self.mask.shape[0]

    @property
    def col_capacity(self) -> int:
        return self.mask.shape[1]

    def live_mask(self) -> torch.Tensor:
        return self.mask[: self.rows, self.start: self.end]  # [B, L] view

    def num_slots(self) -> int:
        """Slots the live window occupies, padding included (what the memory really holds)."""
        return self.rows * self.length

    def num_real_tokens(self) -> int:
        """The mask's count of real tokens: a reduction (and a device sync on CUDA), so the
        engine counts from row positions instead (``ModelRunner.num_cached_tokens``); tests
        check that the two agree."""
        return int(self.live_mask().sum()) if self.rows else 0

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values)) + self.mask.numel()

    # --- capacity --------------------------------------------------------------------------

    def _new_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        # Uninitialised: zero-filling gigabytes of capacity costs seconds on CPU (page faults).
        # Only slots inside the live window are ever read, and those are always written
        # (copied, inserted, or zeroed where masked), see ``insert``.
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.poison is not None:
            buffer.fill_(self.poison)
        return buffer

    def _reallocate(self, row_cap: int, col_cap: int, left_room: int) -> None:
        """New buffers; the live window is copied to start at column ``left_room``."""
        shape = (row_cap, self.num_kv_heads, col_cap, self.head_dim)
        new_mask = torch.zeros(row_cap, col_cap, dtype=torch.bool, device=self.device)
        new_keys, new_values = [], []
        length, rows = self.length, self.rows
        for layer in range(self.num_layers):
            k, v = self._new_buffer(shape), self._new_buffer(shape)
            if rows and length:
                k[:rows, :, left_room: left_room + length] = self.keys[layer][:rows, :, self.start: self.end]
                v[:rows, :, left_room: left_room + length] = self.values[layer][:rows, :, self.start: self.end]
            new_keys.append(k)
            new_values.append(v)
        if rows and length:
            new_mask[:rows, left_room: left_room + length] = self.mask[:rows, self.start: self.end]
        self.keys, self.values, self.mask = new_keys, new_values, new_mask
        self.start, self.end = left_room, left_room + length

    def _reshape_buffers(self, row_cap: int, col_cap: int, left: int, need_cols: int) -> None:
        # A quarter of the spare columns go to the left, for newcomers longer than the
        # batch; the rest to the right, for decode steps.
        self._reallocate(row_cap, col_cap, left_room=left + (col_cap - need_cols) // 4)

    def ensure_capacity(self, rows: int, left: int = 0, right: int = 0) -> None:
        """Make room for ``rows`` rows, ``left`` extra columns before ``start`` and ``right`` after ``end``.

        Capacity grows to ``GROWTH`` times what is needed (amortised O(1) copies per row or
        column added, without doubling's overshoot: the buffers are the biggest allocation).
        """
        need_cols = self.length + left + right
        if (rows <= self.row_capacity and left <= self.start
                and self.end + right <= self.col_capacity):
            return
        row_cap = self.row_capacity
        if rows > row_cap:
            row_cap = max(MIN_ROWS, math.ceil(rows * GROWTH))
        col_cap = self.col_capacity
        if need_cols * GROWTH > col_cap:  # (a window that only needs moving keeps its buffers' size)
            col_cap = max(MIN_COLS, math.ceil(need_cols * GROWTH))
        self._reshape_buffers(row_cap, col_cap, left, need_cols)

    def release(self) -> None:
        """Drop the buffers (called when the batch empties)."""
        self.keys, self.values = [], []
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.rows = self.start = self.end = 0

    # --- the transformers cache protocol (decode step) ------------------------------------

    def begin_step(self, step_rows: int | None = None) -> torch.Tensor:
        """Reserve column ``end`` for this step's token of every row; return the 4-D mask.

        ``step_rows`` (>= B) adds dummy rows ``[B, step_rows)`` to the forward pass (see
        ``row_padding``): each attends only to its own new column, and ``end_step`` masks
        them out again, so the live rows never see them.
        """
        step_rows = max(self.rows, step_rows or 0)
        self.ensure_capacity(step_rows, right=1)
        self._write_col, self._step_rows = self.end, step_rows
        self.mask[self.rows: step_rows, self.start: self.end] = False
        self.mask[:step_rows, self.end] = True
        return self.mask[:step_rows, self.start: self.end + 1][:, None, None, :]  # [B', 1, 1, L+1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's ``[B', H_kv, 1, D]`` K/V in place; return views ``[B', H_kv, L+1, D]``."""
        col, rows = self._write_col, self._step_rows
        assert col is not None, "begin_step() must precede the forward pass"
        self.keys[layer_idx][:rows, :, col] = key_states[:, :, 0]
        self.values[layer_idx][:rows, :, col] = value_states[:, :, 0]
        return (self.keys[layer_idx][:rows, :, self.start: col + 1],
                self.values[layer_idx][:rows, :, self.start: col + 1])

    def abort_step(self) -> None:
        """Undo ``begin_step`` after a failed forward pass."""
        if self._write_col is not None:
            self.mask[: self._step_rows, self._write_col] = False
            self._write_col = None

    def end_step(self) -> None:
        self.mask[self.rows: self._step_rows, self._write_col] = False  # dummy rows leave no trace
        self.end = self._write_col + 1
        self._write_col = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    is_compileable = False

    # --- shaping: insert, remove, extract ------------------------------------------------

    def insert(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor) -> range:
        """Embed ``n`` left-padded rows: per layer ``[n, H_kv, P, D]`` and a mask ``[n, P]``.

        Both sides are shaped to a common length: if P exceeds the batch's length the window
        grows to the left (new columns masked for old rows), otherwise the newcomers are
        right-aligned and masked on the left. Returns the new rows' indices.
        """
        n, width = mask.shape
        if self.rows == 0:
            self.release()  # nothing live: start afresh at column 0
            self.ensure_capacity(n, right=width)
            self.end = self.start + width
        else:
            grow_left = max(0, width - self.length)
            self.ensure_capacity(self.rows + n, left=grow_left)
            if grow_left:  # old rows are masked in the new leading columns
                self.start -= grow_left
                self.mask[: self.rows, self.start: self.start + grow_left] = False
                self._zero(slice(0, self.rows), slice(self.start, self.start + grow_left))
        lo, hi = self.rows, self.rows + n
        col = self.end - width
        self.mask[lo:hi, self.start: col] = False
        self._zero(slice(lo, hi), slice(self.start, col))
        self.mask[lo:hi, col: self.end] = mask.to(self.device)
        for layer in range(self.num_layers):
            self.keys[layer][lo:hi, :, col: self.end] = keys[layer]
            self.values[layer][lo:hi, :, col: self.end] = values[layer]
        self.rows = hi
        return range(lo, hi)

    def _zero(self, rows: slice, cols: slice) -> None:
        """Masked slots inside the live window are still read by attention: keep them finite."""
        if cols.stop > cols.start and rows.stop > rows.start:
            for layer in range(self.num_layers):
                self.keys[layer][rows, :, cols].zero_()
                self.values[layer][rows, :, cols].zero_()

    def insert_row(self, row: RowKV) -> int:
        """Embed one unpadded row (e.g. swapped back in from host memory)."""
        width = row.num_tokens
        keys = [k.to(self.device, non_blocking=True)[None] for k in row.keys]
        values = [v.to(self.device, non_blocking=True)[None] for v in row.values]
        mask = torch.ones(1, width, dtype=torch.bool, device=self.device)
        return self.insert(keys, values, mask)[0]

    def extract_row(self, index: int) -> RowKV:
        """A copy of row ``index``'s real K/V, without padding (the row stays in place)."""
        first = self.end - int(self.mask[index, self.start: self.end].sum())
        return RowKV([k[index, :, first: self.end].clone() for k in self.keys],
                     [v[index, :, first: self.end].clone() for v in self.values])

    def remove_rows(self, indices: list[int]) -> list[tuple[int, int]]:
        """Remove rows; returns the moves ``(old_index, new_index)`` of the rows that were relocated.

        Each removed slot is filled by the current last row (swap-remove), highest index
        first so that a pending removal never refers to a row that was moved.
        """
        moves: list[tuple[int, int]] = []
        for index in sorted(set(indices), reverse=True):
            last = self.rows - 1
            if index != last:
                self._copy_row(last, index)
                moves.append((last, index))
            self.mask[last, self.start: self.end] = False
            self.rows = last
        self.trim()
        return _compose_moves(moves)

    def _copy_row(self, src: int, dst: int) -> None:
        s, e = self.start, self.end
        for layer in range(self.num_layers):
            self.keys[layer][dst, :, s:e] = self.keys[layer][src, :, s:e]
            self.values[layer][dst, :, s:e] = self.values[layer][src, :, s:e]
        self.mask[dst, s:e] = self.mask[src, s:e]

    def trim(self) -> None:
        """Advance ``start`` past columns that are padding in every row; free all if empty."""
        if self.rows == 0:
            self.release()
            return
        used = self.live_mask().any(dim=0)  # [L]
        self.start += int(torch.argmax(used.to(torch.int8)))  # first used column

    def shrink_if_sparse(self, min_utilisation: float) -> bool:
        """Re-allocate tighter buffers when the live window uses too little of them.

        After long rows leave, the buffers keep their peak size; when live slots / allocated
        slots drops below ``min_utilisation``, one O(B*L) copy returns the memory (only if
        that halves it at least). The new buffers keep ``GROWTH`` room, so growth right after
        a shrink does not undo it.
        """
        allocated = self.row_capacity * self.col_capacity
        if self.rows == 0 or allocated == 0 or self.num_slots() / allocated >= min_utilisation:
            return False
        row_cap = max(MIN_ROWS, math.ceil(self.rows * GROWTH))
        col_cap = max(MIN_COLS, math.ceil(self.length * GROWTH))
        if row_cap * col_cap > allocated // 2:
            return False  # e.g. a tiny batch in minimum-size buffers: a copy would return nothing
        self._reshape_buffers(row_cap, col_cap, 0, self.length)
        return True


def _compose_moves(moves: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Collapse chained moves (a->b then b->c) into final ``(original, final)`` pairs."""
    final: dict[int, int] = {}
    for src, dst in moves:
        origin = next((o for o, cur in final.items() if cur == src), src)
        final[origin] = dst
    return sorted(final.items())
