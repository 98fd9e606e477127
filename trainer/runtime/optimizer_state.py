"""The dense part's optimizer state by parameter name: kept with the best weights, carried by a
warm start.

A run keeps ``optimizer.pt`` beside ``model.pt`` (``trainer.runtime.checkpoint.save_best``)::

    {"epoch": best epoch, "optimizer": "Adam" | "SGD",
     "state": {parameter name: {"step": [], "exp_avg": [*shape], "exp_avg_sq": [*shape]}}}

(host tensors; the keys of ``state[name]`` are the torch optimizer's own). The file is the same
whatever the ZeRO stage and world size: under ZeRO 0 the torch optimizer holds the model's own
parameters and the state is read per parameter; under ZeRO 1 and 2 it holds each rank's flat
fp32 partition and DeepSpeed's fragment API (``safe_get_full_optimizer_state``, collective)
assembles each parameter's full state.

A warm start (:func:`carry_optimizer_state`) gives each parameter of the new run the previous
run's state (under ZeRO 1/2: each rank writes its fragment of it). The dense item table
``table.weight [N + 1, D]`` grew: rows ``0..N_old-1`` take the old state, the new items' rows
(and the padding row) start at zero, i.e. fresh moments. torch's Adam counts steps per
parameter, not per row, so the new rows' first updates are those of a fresh Adam without its
bias correction (about ``3 * lr`` per coordinate at the default betas).
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZER_FILE = "optimizer.pt"
TABLE_WEIGHT = "table.weight"


def holds_model_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """True if ``optimizer`` updates ``model``'s own parameter tensors (ZeRO stage 0)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return all(id(p) in held for p in model.parameters())


def partitioned(model: nn.Module) -> bool:
    """True if DeepSpeed's ZeRO 1/2 optimizer maps ``model``'s parameters to flat partitions."""
    return all(hasattr(p, "_hp_mapping") for p in model.parameters())


def named_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int
) -> dict | None:
    """The content of ``optimizer.pt`` (module docstring): under ZeRO 0 every parameter that has
    a state (none for plain SGD); None when ``optimizer`` is neither ZeRO 0's nor ZeRO 1/2's, or
    is ZeRO 1/2's before its first step. Collective under ZeRO 1/2."""
    if optimizer is None:
        return None
    if holds_model_parameters(model, optimizer):
        state = {
            name: {key: value.detach().cpu() for key, value in optimizer.state[p].items()}
            for name, p in model.named_parameters()
            if optimizer.state.get(p)
        }
    elif partitioned(model) and any(optimizer.state.values()):
        from deepspeed.utils import safe_get_full_optimizer_state

        flat = next(s for s in optimizer.state.values() if s)
        keys = [key for key in flat if key != "step"]
        state = {
            name: {"step": flat["step"].detach().cpu()}
            | {key: safe_get_full_optimizer_state(p, key).cpu() for key in keys}
            for name, p in model.named_parameters()
        }
    else:
        return None
    return {"epoch": epoch, "optimizer": type(optimizer).__name__, "state": state}


def grown(name: str, p: torch.Tensor, old: dict, num_old: int) -> dict[str, torch.Tensor]:
    """``old`` (one parameter's saved state) for ``p``: the table weight's rows beyond
    ``num_old`` at zero. Raises ``ValueError`` for a state of another shape."""
    out = {}
    for key, value in old.items():
        if value.dim() > 0 and value.shape != p.shape:
            fits = value.shape[1:] == p.shape[1:] and value.shape[0] <= p.shape[0]
            if name != TABLE_WEIGHT or not fits:
                raise ValueError(
                    f"the saved optimizer state {name}.{key} is {list(value.shape)}, the "
                    f"parameter is {list(p.shape)}"
                )
            rows = torch.zeros(p.shape, dtype=value.dtype, device=p.device)
            rows[:num_old] = value[:num_old].to(p.device)  # new items and padding row: fresh
            value = rows
        out[key] = value.to(p.device)
    return out


@torch.no_grad()
def carry_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, num_old: int
) -> int:
    """Give ``model``'s parameters the state ``saved`` (an ``optimizer.pt``) holds for them
    (:func:`grown`); returns how many parameters took a state. Under ZeRO 1/2 the flat
    partitions' state is created here (zeros, the saved step) and linked to the parameters'
    fragments as DeepSpeed links it after its first step; then each rank writes its fragments."""
    named = [(name, p, saved["state"][name]) for name, p in model.named_parameters()
             if name in saved["state"]]  # fmt: skip
    if not named:  # e.g. plain SGD: no state to carry
        return 0
    if not holds_model_parameters(model, optimizer):
        from deepspeed.utils import safe_set_full_optimizer_state

        step = named[0][2]["step"]
        keys = [key for key in named[0][2] if key != "step"]
        for group in optimizer.param_groups:
            for flat in group["params"]:
                optimizer.state[flat] = {"step": step.to(flat.device)} | {
                    key: torch.zeros_like(flat) for key in keys
                }
        for p in model.parameters():
            if p._hp_mapping is not None:  # this rank holds a fragment of p
                flat = optimizer.param_groups[p._hp_mapping.param_group_index]["params"][0]
                p._hp_mapping.set_optim_state_fragment(flat, optimizer.state[flat])
        for name, p, old in named:
            for key, value in grown(name, p, old, num_old).items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value, key)
        return len(named)
    for name, p, old in named:
        optimizer.state[p] = grown(name, p, old, num_old)
    return len(named)
