"""Training state kept out of the forward: DeepSeek-V3's auxiliary-loss-free bias update and the router
statistics (tokens per expert, MaxVio).

Models install these hooks when they are built (:func:`attach_training_hooks`); their forward changes
nothing. A forward hook on each router counts its tokens per expert (in training forwards also into the
step's load, except during the recomputation gradient checkpointing does). After each optimizer step,
:func:`finish_optimizer_step` closes the step:

* V3 routers move ``e_score_correction_bias`` by ``-gamma * sign(load_i - mean_load)`` (``gamma`` =
  ``config.bias_update_speed``; loads summed over gradient-accumulation micro-batches and, when
  torch.distributed is initialised, all-reduced over the ranks);
* every router keeps the step's load as ``last_step_load``, from which MaxVio = max/mean - 1.

It runs by itself: a global optimizer post-step hook acts on the optimizers that hold a model's
parameters (plain loops, ``Trainer``, PEFT). :class:`RouterStatsCallback` adds the statistics and the last
balance loss to ``Trainer``'s logs.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook

from .routing import RouterOutput, TopKRouter, tokens_per_expert

_TRAINING_MODELS: weakref.WeakSet = weakref.WeakSet()
_OPTIMIZER_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HOOK_HANDLE = None
_HOOKED: weakref.WeakSet = weakref.WeakSet()  # modules whose hooks are installed
_LAST_BALANCE_LOSS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # causal LM -> its last aux_loss


def attach_training_hooks(model: torch.nn.Module) -> None:
    """Install, once, what training needs around ``model``'s forward: the load-counting hook on each of its
    routers, a hook keeping a causal LM's last balance loss for the logs, and the optimizer post-step hook
    (:func:`track_optimizer_steps`). Models call this when they are built."""
    for module in (model, *routers(model).values()):
        if module not in _HOOKED:
            module.register_forward_hook(_count_loads if isinstance(module, TopKRouter) else _keep_balance_loss)
            _HOOKED.add(module)
    track_optimizer_steps(model)


def _inside_backward() -> bool:
    """Whether autograd is running a backward pass, where gradient checkpointing recomputes forwards. (No
    public torch API says so: this private call is the package's only one, kept here.)"""
    return torch._C._current_graph_task_id() != -1


def _count_loads(router: TopKRouter, args, output: RouterOutput) -> None:
    """Tokens per expert of the router's last forward; in training also added to the step's load, except
    when gradient checkpointing recomputes the forward inside the backward (they would count twice). Counted
    into the float32 buffer in place (no autograd: neither the buffer nor the ones need gradients): three tensor
    operations where counting in int64 and copying took six (bench_fp8.py's model, one token: 0.986x the
    forward's time; the hooks cost 2-5% of it in all)."""
    load = tokens_per_expert(output.topk_indices, router.num_experts, out=router.last_forward_load)
    if router.training and not _inside_backward():
        router.step_load += load.to(router.step_load.device)


def _keep_balance_loss(model: torch.nn.Module, args, output) -> None:
    """A causal LM's last balance loss, for :class:`RouterStatsCallback`."""
    if getattr(output, "aux_loss", None) is not None:
        _LAST_BALANCE_LOSS[model] = output.aux_loss.detach()


def routers(model: torch.nn.Module) -> dict[str, TopKRouter]:
    """``{module name: router}`` of every MoE layer (MTP layers included)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, TopKRouter)}


def max_violation(load: torch.Tensor) -> float:
    """The V3 paper's balance metric: ``max_load / mean_load - 1`` (0 = perfectly balanced)."""
    mean = load.float().mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0


@torch.no_grad()
def finish_optimizer_step(model: torch.nn.Module) -> None:
    """Close an optimizer step: update V3 correction biases from the step's loads, keep the loads as
    ``last_step_load`` and start counting the next step. Call it after ``optimizer.step()`` if the
    automatic hook is not wanted (see :func:`track_optimizer_steps`)."""
    for router in routers(model).values():
        load = router.step_load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if load.sum() == 0:
            continue  # no training forward since the last step
        gamma = router.bias_update_speed
        if router.e_score_correction_bias is not None and gamma > 0:
            router.e_score_correction_bias -= gamma * torch.sign(load - load.mean()).to(router.e_score_correction_bias.device)
        router.last_step_load.copy_(load)
        router.step_load.zero_()


def router_statistics(model: torch.nn.Module) -> dict[str, dict]:
    """Per MoE layer: tokens per expert in the last forward and the last finished optimizer step, and
    MaxVio of each."""
    statistics = {}
    for name, router in routers(model).items():
        statistics[name.removesuffix(".gate")] = {
            "last_forward_tokens_per_expert": router.last_forward_load.tolist(),
            "last_forward_max_vio": max_violation(router.last_forward_load),
            "last_step_tokens_per_expert": router.last_step_load.tolist(),
            "last_step_max_vio": max_violation(router.last_step_load),
        }
    return statistics


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for model in list(_TRAINING_MODELS):
        if _holds_parameters_of(optimizer, model):
            finish_optimizer_step(model)


def _holds_parameters_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
    known = _OPTIMIZER_MODELS.setdefault(optimizer, weakref.WeakKeyDictionary())
    if model not in known:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        known[model] = any(id(p) in ids for p in model.parameters())
    return known[model]


def track_optimizer_steps(model: torch.nn.Module) -> None:
    """Have :func:`finish_optimizer_step` run after every step of any optimizer holding ``model``'s
    parameters (see :func:`attach_training_hooks`)."""
    global _HOOK_HANDLE
    _TRAINING_MODELS.add(model)
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_after_optimizer_step)


def _router_stats_callback() -> type:
    from transformers import TrainerCallback

    class RouterStatsCallback(TrainerCallback):
        """Adds ``moe/max_vio`` (mean over layers of the last step's MaxVio), ``moe/max_vio_worst`` and
        ``moe/aux_loss`` to ``Trainer``'s logs: the printed ones and ``state.log_history`` (report_to
        integrations listed before this callback log before it runs)."""

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if model is None or logs is None:
                return
            entries = {}
            violations = [max_violation(r.last_step_load) for r in routers(model).values() if r.last_step_load.sum() > 0]
            if violations:
                entries["moe/max_vio"] = round(sum(violations) / len(violations), 4)
                entries["moe/max_vio_worst"] = round(max(violations), 4)
            losses = [_LAST_BALANCE_LOSS[m] for m in model.modules() if m in _LAST_BALANCE_LOSS]
            if losses:
                entries["moe/aux_loss"] = round(float(losses[0].float().cpu()), 6)
            logs.update(entries)
            if state.log_history:
                state.log_history[-1].update(entries)

    return RouterStatsCallback


def __getattr__(name: str):
    """``RouterStatsCallback`` is defined on first use: transformers' ``TrainerCallback`` imports its trainer
    utilities, and they PEFT and bitsandbytes where installed (1.4 s, and a line on stderr from bitsandbytes on
    some CPUs), which loading and generating never need."""
    if name == "RouterStatsCallback":
        globals()[name] = _router_stats_callback()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
