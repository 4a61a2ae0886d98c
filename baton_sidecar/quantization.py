"""int8 weights for CPU decode: every ``nn.Linear`` (the output head included) becomes W8A8.

Weights are int8 per output channel (symmetric); activations are quantized per *row* (one
scale per token) at each call, after a per-input-channel smoothing (SmoothQuant, alpha 0.5:
``x / s`` and ``W * s`` move the activations' outlier channels into the weights, which quantize
them better; ``s`` comes from a short calibration pass over ``CALIBRATION``; linears that read
one input, q/k/v and gate/up, share ``s`` and the quantized input, ``SharedInput``). The product is
``torch._int_mm`` (int8 x int8 -> exact int32), scaled back to float. Each row's output is a
function of that row alone, bit for bit, whatever is batched beside it.

Why not ``torch.ao.quantization.quantize_dynamic`` (fbgemm), a little faster still: it picks
one activation scale for the whole input tensor, so a row's logits move with its batch
neighbours (and with padding) - a row's output differs by ~10x its quantization error
depending on what it is batched with. Measured on a 2-core AVX-512 machine, one thread,
SmolLM2-135M decode step at context 128, median of 8 (README, "int8 weights"):

    batch   float32   fbgemm (per-tensor)   this (per-row)
      1      54 ms        20 ms                 29 ms
      4      82 ms        24 ms                 43 ms
     16     131 ms        48 ms                 71 ms

Attention is the one batch-dependent part left; with int8 each row attends alone
(``row_attention.py``), so greedy output equals ``generate`` on the same int8 model.

``torch._int_mm`` is a private op; ``tests/engine/test_quantization.py`` fails loudly if it
disappears or changes meaning on a torch upgrade. CUDA is refused (``_int_mm`` needs > 16
rows there, which a decode step rarely has); run bfloat16 on GPUs instead.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .config import QUANTIZATIONS

QMAX = 127  # symmetric int8: [-127, 127], so -x quantizes to -q


class SharedInput:
    """One quantized input for the linears that read the same tensor (q/k/v; gate/up).

    They share ``inv_smooth`` (calibrated together), so the first of them quantizes ``x`` and
    the others reuse it. The tensor is held until every member has read it (so its identity
    can't be recycled meanwhile), then dropped: a large prefill's activations are not kept
    after the layer. Per thread, so two threads running the model never see each other's input.
    """

    def __init__(self, members: int) -> None:
        self.members = members
        self._last = threading.local()

    def get(self, x: torch.Tensor, quantize) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last
        if getattr(last, "x", None) is not x:
            last.x, last.quantized, last.reads = x, quantize(x), 0
        quantized = last.quantized
        last.reads += 1
        if last.reads == self.members:
            last.x = last.quantized = None
        return quantized


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` int8 per output channel and ``x`` int8 per row.

    Buffers: ``qweight [N, K]`` int8, ``scale [N]`` float32, ``inv_smooth [K]``
    (``W ~= qweight * scale[:, None] * inv_smooth``), ``bias [N]`` or None. Quacks like ``nn.Linear`` where the engine looks
    (``in_features``, ``out_features``) but has no float ``weight``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shared: SharedInput | None = None  # set by share_inputs for q/k/v, gate/up
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("inv_smooth", torch.ones(in_features))  # [K] 1 / s
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, act_max: torch.Tensor | None = None,
                   w_max: torch.Tensor | None = None) -> "Int8Linear":
        """``act_max [K]``: the calibration's largest |input| per channel (None: no smoothing);
        ``w_max [K]``: the largest |weight| per input channel over the linears that share this
        input (default: this one's), so that they share one smoothing and one quantized input."""
        weight = linear.weight.detach().float()  # [N, K]
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        if act_max is not None:
            w_max = (w_max if w_max is not None else weight.abs().amax(dim=0)).clamp(min=1e-5)  # [K]
            smooth = (act_max.float().clamp(min=1e-5).sqrt() / w_max.sqrt()).clamp(min=1e-5)  # alpha 0.5
            weight = weight * smooth
            module.inv_smooth.copy_(1.0 / smooth)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / QMAX  # [N]
        module.qweight.copy_(torch.round(weight / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8))
        module.scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., K]`` -> ``(qx [M, K] int8, x_scale [M, 1])``, one scale per row."""
        rows = x.reshape(-1, self.in_features) * self.inv_smooth  # [M, K], a new float32 tensor
        # |rows / x_scale| <= 127 by construction, so no clamp (an all-zero row gets the floor
        # scale and quantizes to zeros). abs().amax() gives the same numbers as vector_norm(inf),
        # 6-15x faster on a batch of rows.
        x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(QMAX)
        return rows.div_(x_scale).round_().to(torch.int8), x_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Few ops, in place where the tensor is our own: at decode each is ~M*K elements, and
        # op dispatch (~2 us each, 200 linears a step) is a large share of a batch-1 step.
        qx, x_scale = self.shared.get(x, self.quantize_input) if self.shared else self.quantize_input(x)
        acc = torch._int_mm(qx, self.qweight.t())  # [M, N] int32, exact: K * 127^2 << 2^31
        out = acc.mul(x_scale).mul_(self.scale)  # int32 * float32 -> float32
        if self.bias is not None:
            out = out.add_(self.bias)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def check_supported(quantization: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming ``quantization`` for a combination that cannot run."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}")
    if quantization == "int8" and device.type != "cpu":
        raise ValueError(f"quantization: int8 runs on CPU only (device is {device.type}); "
                         "use --dtype bfloat16 on GPUs")
    if quantization == "int8" and dtype != torch.float32:
        raise ValueError("quantization: int8 needs --dtype float32 (the non-linear layers stay float32)")


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """``(qualified name, parent, attribute, linear)`` for every ``nn.Linear`` in ``model``."""
    return [(f"{prefix}.{name}" if prefix else name, parent, name, child)
            for prefix, parent in model.named_modules()
            for name, child in parent.named_children() if type(child) is nn.Linear]


# Calibration text for the smoothing factors: mixed prose, code, lists and chat, written for
# this purpose (outlier channels are a property of the model, not of the text, so a few hundred
# tokens find them). Held-out evaluation texts must never be drawn from here.
CALIBRATION = [
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp "
    "and a notebook in which he wrote down the colour of the sea, the direction of the wind and "
    "the names of the ships that passed. Nobody ever read the notebooks, but he kept them all.",
    "def merge_sorted(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    "Steps to repot a plant:\n1. Water it the day before.\n2. Choose a pot 2-5 cm wider.\n"
    "3. Loosen the roots gently.\n4. Add fresh soil and press it down.\n5. Water again and keep "
    "it out of direct sun for a week.",
    "User: Can you explain what a hash table is?\nAssistant: A hash table stores key-value pairs in "
    "an array. A hash function turns each key into an index, so lookups, inserts and deletes take "
    "constant time on average. Collisions are handled by chaining or open addressing.",
    "In 1905 Einstein published four papers: on the photoelectric effect, Brownian motion, special "
    "relativity and the equivalence of mass and energy, E = mc^2. The integral of x^2 from 0 to 3 "
    "is 9, and 17 * 23 = 391.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id "
    "WHERE orders.created_at >= '2024-01-01' GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Querida Ana: gracias por tu carta. Aquí hace frío, pero el pueblo está precioso con la nieve. "
    "Bonjour à tous, la réunion est reportée à jeudi. Guten Morgen, wie geht es dir?",
    "Pros and cons of remote work. Pros: no commute, flexible hours, fewer interruptions. Cons: "
    "isolation, blurred boundaries between work and home, harder mentoring of new colleagues.",
]


@torch.inference_mode()
def calibrate(model: nn.Module, tokenizer, texts: list[str] = CALIBRATION
              ) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """``(maxima, groups)``: every ``nn.Linear``'s largest |input| per channel ``[K]`` over
    ``texts`` (float model), and the linears that read the very same input tensor."""
    maxima: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}  # name -> its input in the first forward (held: ids stay unique)

    def hook(name: str):
        def record(module, args, output) -> None:
            inputs.setdefault(name, args[0])
            seen = args[0].detach().reshape(-1, module.in_features).abs().amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen
        return record

    handles = [linear.register_forward_hook(hook(name)) for name, _, _, linear in _linears(model)]
    try:
        device = next(model.parameters()).device
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :512].to(device)
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, tensor in inputs.items():
        groups.setdefault(id(tensor), []).append(name)
    return maxima, list(groups.values())


def quantize(model: nn.Module, tokenizer) -> nn.Module:
    """Calibrate, then replace every ``nn.Linear`` of ``model`` with its ``Int8Linear``, in place.

    Linears that read one input (q/k/v, gate/up) are smoothed together and share its
    quantization. A head tied to the input embedding gets its own int8 copy; the embedding
    stays float (a lookup reads one row per token, so int8 would save no time there).
    """
    maxima, groups = calibrate(model, tokenizer)
    linears = {name: linear for name, _, _, linear in _linears(model)}
    w_max = {}
    for group in groups:
        joint = torch.stack([linears[n].weight.detach().float().abs().amax(dim=0) for n in group]).amax(dim=0)
        w_max.update(dict.fromkeys(group, joint))
    for name, parent, attr, linear in _linears(model):
        setattr(parent, attr, Int8Linear.from_float(linear, maxima.get(name), w_max.get(name)))
    _untie(model)
    share_inputs(model)
    return model


def share_inputs(model: nn.Module) -> None:
    """Give the ``Int8Linear`` children of one module with equal ``inv_smooth`` one
    ``SharedInput``. Safe for any grouping: a linear whose input is not the tensor its group
    saw last quantizes its own."""
    for parent in model.modules():
        children = [c for c in parent.children() if isinstance(c, Int8Linear)]
        while children:
            first, children = children[0], children[1:]
            group = [first] + [c for c in children if c.in_features == first.in_features
                               and torch.equal(c.inv_smooth, first.inv_smooth)]
            children = [c for c in children if c not in group]
            shared = SharedInput(len(group)) if len(group) > 1 else None
            for member in group:
                member.shared = shared


def load_quantized(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Swap in ``Int8Linear`` shells filled from ``state`` (``int8_state`` of the same model).

    Raises ``ValueError`` unless ``state`` holds exactly the shells' buffers with their shapes
    and dtypes: a stale or foreign cache is rebuilt, never half-loaded.
    """
    shells = [(name, parent, attr, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None))
              for name, parent, attr, linear in _linears(model)]
    expected = {f"{name}.{key}": tensor for name, _, _, shell in shells for key, tensor in shell.state_dict().items()}
    if set(state) != set(expected) or any(state[k].shape != v.shape or state[k].dtype != v.dtype
                                          for k, v in expected.items()):
        raise ValueError("int8 state does not match the model's linear layers")
    for name, parent, attr, shell in shells:
        shell.load_state_dict({key: state[f"{name}.{key}"] for key in shell.state_dict()})
        setattr(parent, attr, shell.to(next(model.parameters()).device))
    _untie(model)
    share_inputs(model)
    return model


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``Int8Linear`` buffers of a quantized model, by their state-dict names."""
    return {f"{prefix}.{key}": tensor.contiguous() for prefix, module in model.named_modules()
            if isinstance(module, Int8Linear) for key, tensor in module.state_dict().items()}


def _untie(model: nn.Module) -> None:
    # transformers re-ties the head to the embedding on some calls (tie_weights); with the
    # head quantized there is nothing left to tie.
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
