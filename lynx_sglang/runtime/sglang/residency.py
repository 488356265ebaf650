"""lynx's residency-aware mode on SGLang's paged experts: where a layer's residency state is, read-only.

With ``--enable-paged-experts --paged-experts-num-resident K`` SGLang 0.5.23 replaces each
``FusedMoE``'s quant method with a ``PagedExpertsMoEMethod``: K expert slots on the GPU, the other
experts paged in from host memory (docs/offload.md). With CUDA graphs not fully disabled the layer
keeps its LRU state on the device, ``quant_method.device_executor.residency`` (a
``DeviceResidency``), whose ``expert_slot`` (int32 [E], -1 = not resident) both executors keep
current in place: the decide kernel on the device path, ``store_from`` after every host-planned step.

``paged_expert_slots`` pairs every selected ``TopK`` layer whose policy asks for residency
(``--lynx-residency keep|prefer``) with the paged ``FusedMoE`` of the same ``layer_id`` and
returns that ``expert_slot``: a reference the layer's selector reads as ``expert_slot >= 0`` on
every step (one device op, capturable, no host sync). We never write it. When our ``TopK.forward``
hook runs for layer L, it holds the residency layer L's previous step left: the state the
layer's paging of this step starts from.

Refused at start-up (ConfigError): residency asked for but no layer is paged; a paged layer
without device residency state (CUDA graphs fully disabled: the state is then only the host
``OrderedDict`` ``quant_method.policy.resident``, and a per-step host-built mask is not done here);
an ``expert_slot`` that is not an int32 [E] tensor on the model's device; two paged layers with one
``layer_id``. Selected layers that are not paged run plain lynx, bit for bit (logged).
"""

from __future__ import annotations

import logging
import sys
from typing import Dict, Optional, Sequence, Tuple

import torch

from lynx_sglang.runtime.selection.config import ConfigError, RouterSpec

logger = logging.getLogger(__name__)

# SGLang's paged-experts method module. A process with paged layers has imported it (every
# PagedExpertsMoEMethod comes from it), so we look it up instead of importing it: a process without
# paged experts pays nothing, and a model with none is recognised without importing SGLang's MoE stack.
PAGED_METHOD_MODULE = "sglang.srt.layers.moe.paged_experts.method"
PAGED_METHOD_CLASS = "PagedExpertsMoEMethod"
FLAG = "--lynx-residency"


def paged_method_type() -> Optional[type]:
    """SGLang's ``PagedExpertsMoEMethod`` if its module is loaded in this process, else None."""
    module = sys.modules.get(PAGED_METHOD_MODULE)
    return None if module is None else getattr(module, PAGED_METHOD_CLASS, None)


def paged_layers(model) -> Dict[int, torch.nn.Module]:
    """``layer_id`` -> the MoE layer (``FusedMoE``) of ``model`` whose experts SGLang pages."""
    cls = paged_method_type()
    if cls is None:
        return {}
    found: Dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if not isinstance(getattr(module, "quant_method", None), cls):
            continue
        layer_id = getattr(module, "layer_id", None)
        if not isinstance(layer_id, int):
            raise ConfigError(f"{FLAG}: a paged-experts MoE layer ({type(module).__name__}) has no integer layer_id, "
                              f"so it cannot be paired with its router's TopK")
        if layer_id in found:
            raise ConfigError(f"{FLAG}: two paged-experts MoE layers share layer_id {layer_id}; cannot tell which "
                              f"one the router of that layer feeds")
        found[layer_id] = module
    return found


def expert_slot_of(layer: torch.nn.Module, layer_id: int, router: RouterSpec, device: torch.device) -> torch.Tensor:
    """The paged layer's device ``expert_slot`` (int32 [E]), checked; ConfigError where it cannot serve."""
    method = layer.quant_method
    executor = getattr(method, "device_executor", None)
    residency = getattr(executor, "residency", None)
    if executor is None:  # the CPU server: its support gives the eager executor one (cpu/support.py)
        residency = getattr(getattr(method, "executor", None), "device_residency", None)
    if residency is None:
        raise ConfigError(
            f"{FLAG}: paged-experts layer {layer_id} keeps no device residency state (SGLang builds it only "
            f"when CUDA graphs are not fully disabled, e.g. no --disable-cuda-graph); lynx reads residency on "
            f"the device without a host sync and does not build a mask from the host LRU each step. Enable "
            f"CUDA graphs, or run with {FLAG} off")
    slot = getattr(residency, "expert_slot", None)
    E = router.num_experts
    if not isinstance(slot, torch.Tensor) or slot.dim() != 1 or slot.shape[0] != E or slot.dtype != torch.int32:
        what = f"{slot.dtype} {tuple(slot.shape)}" if isinstance(slot, torch.Tensor) else type(slot).__name__
        raise ConfigError(f"{FLAG}: paged-experts layer {layer_id}'s residency expert_slot is {what}, expected int32 "
                          f"[{E}] (one slot per routed expert, -1: not resident); an SGLang we do not know, refusing")
    if slot.device != device:
        raise ConfigError(f"{FLAG}: paged-experts layer {layer_id}'s expert_slot is on {slot.device}, the model's "
                          f"router on {device}")
    eager = getattr(getattr(method, "executor", None), "device_residency", residency)
    if eager is not residency:  # both executors must move the one state we read
        raise ConfigError(f"{FLAG}: paged-experts layer {layer_id}'s eager and device executors hold different "
                          f"residency states; an SGLang we do not know, refusing")
    return slot


def paged_expert_slots(model, options, planned: Sequence[Tuple[int, RouterSpec]],
                       device: torch.device) -> Dict[int, torch.Tensor]:
    """``layer_id`` -> ``expert_slot`` for every planned layer whose policy asks for residency and is paged.

    ``planned``: (layer_id, RouterSpec) of the layers selection runs on. Empty when no layer's policy
    asks for residency. ConfigError: residency asked for but no planned layer is paged, or a paged
    layer's state cannot be read (``expert_slot_of``).
    """
    wanted = [(layer_id, router) for layer_id, router in planned
              if getattr(options.make_policy(layer_id), "residency", "off") != "off"]
    if not wanted:
        return {}
    layers = paged_layers(model)
    slots = {layer_id: expert_slot_of(layers[layer_id], layer_id, router, device)
             for layer_id, router in wanted if layer_id in layers}
    if not slots:
        raise ConfigError(f"{FLAG} asks for residency-aware selection, but the model has no paged-experts MoE layer "
                          f"among those selection runs on (start SGLang with --enable-paged-experts "
                          f"--paged-experts-num-resident K, or drop {FLAG})")
    plain = sorted(layer_id for layer_id, _ in wanted if layer_id not in slots)
    if plain:
        logger.warning("lynx-sglang: %s: layer(s) %s are not paged and run plain lynx", FLAG, plain)
    some = next(iter(slots))
    logger.info("lynx-sglang: residency-aware selection (%s) on %d paged layer(s), K = %s resident slots of E = %d; "
                "each step reads the layer's DeviceResidency.expert_slot on the device",
                options.make_policy(some).residency, len(slots),
                getattr(layers[some].quant_method, "num_resident", "?"), slots[some].shape[0])
    return slots


def layer_output_norms(hf_config, options, slots: Dict[int, torch.Tensor]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """``layer_id`` -> (weight [2H, E], bias [E]) for every paged layer (``slots``) whose policy has a page budget,
    from ``--lynx-residency-output-norms`` (empty without it). ConfigError: the file does not fit the served model
    (``output_norms.load_output_norms``), or no paged layer has a budget to rank."""
    if options.output_norms is None:
        return {}
    from lynx_sglang.runtime.selection.model_identity import model_identity
    from lynx_sglang.runtime.selection.output_norms import load_output_norms

    budgeted = sorted(layer_id for layer_id in slots
                      if getattr(options.make_policy(layer_id), "residency_page_budget", None) is not None)
    if not budgeted:
        raise ConfigError("--lynx-residency-output-norms ranks a paged layer's page budget, but no paged layer has "
                          "one (--lynx-residency-page-budget N, or a per-layer plan's residency_page_budget)")
    loaded = load_output_norms(options.output_norms, model_identity(hf_config), budgeted)
    logger.info("lynx-sglang: page budgets on %d paged layer(s) rank by predicted output share (%s)", len(budgeted),
                options.output_norms)
    return {layer_id: loaded.heads[layer_id] for layer_id in budgeted}

