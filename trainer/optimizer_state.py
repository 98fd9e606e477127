"""The dense part's optimizer state by parameter name: kept with the best weights, carried by a
warm start.

A run keeps ``optimizer.pt`` beside ``model.pt`` (``trainer.checkpoint.save_best``)::

    {"epoch": best epoch, "optimizer": "Adam" | "SGD",
     "state": {parameter name: {"step": [], "exp_avg": [*shape], "exp_avg_sq": [*shape]}}}

(host tensors; the keys of ``state[name]`` are the torch optimizer's own). Only under ZeRO stage
0, where the torch optimizer holds the model's own parameters; under ZeRO 1 and 2 it holds flat
partitions and no file is written (a warm start then starts the dense part's state fresh).

A warm start (:func:`carry_optimizer_state`) gives each parameter of the new run the previous
run's state. The dense item table ``table.weight [N + 1, D]`` grew: rows ``0..N_old-1`` take the
old state, the new items' rows (and the padding row) start at zero, i.e. fresh moments. torch's
Adam counts steps per parameter, not per row, so the new rows' first updates are those of a
fresh Adam without its bias correction (about ``3 * lr`` per coordinate at the default betas).
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


def named_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, epoch: int
) -> dict | None:
    """The content of ``optimizer.pt`` (module docstring), or None when ``optimizer`` does not
    hold ``model``'s parameters or has no state yet."""
    if optimizer is None or not holds_model_parameters(model, optimizer):
        return None
    state = {
        name: {key: value.detach().cpu() for key, value in optimizer.state[p].items()}
        for name, p in model.named_parameters()
        if optimizer.state.get(p)
    }
    if not state:
        return None
    return {"epoch": epoch, "optimizer": type(optimizer).__name__, "state": state}


@torch.no_grad()
def carry_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, num_old: int
) -> int:
    """Give ``model``'s parameters the state ``saved`` (an ``optimizer.pt``) holds for them,
    grown rows of the table at zero; returns how many parameters took a state. Raises
    ``ValueError`` naming a parameter whose saved state has another shape."""
    carried = 0
    for name, p in model.named_parameters():
        old = saved["state"].get(name)
        if old is None:
            continue
        state = {}
        for key, value in old.items():
            if value.dim() > 0 and value.shape != p.shape:
                grows = value.shape[1:] == p.shape[1:] and value.shape[0] <= p.shape[0]
                if name != TABLE_WEIGHT or not grows:
                    raise ValueError(
                        f"the saved optimizer state {name}.{key} is {list(value.shape)}, the "
                        f"parameter is {list(p.shape)}"
                    )
                grown = torch.zeros(p.shape, dtype=value.dtype)
                grown[:num_old] = value[:num_old]  # new items and the padding row: fresh
                value = grown
            state[key] = value.to(p.device)
        optimizer.state[p] = state
        carried += 1
    return carried
