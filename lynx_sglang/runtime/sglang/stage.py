"""The per-layer selection stage: what our ``TopK.forward`` hook runs on every MoE layer.

``prepare`` (called once after the model loads, before CUDA-graph capture)
refuses configurations we cannot serve, decided from the server args
(``refusal``), then ``build_stages`` attaches one ``TopKSelectionStage`` to every
enabled ``TopK`` layer (refusing layers we cannot serve) and the stages are
registered (``StageRegistry``). Each stage owns its layer's ``ExpertSelector``
(planned once; re-planned only for new top-k dtypes) and rewrites the router's
``StandardTopKOutput`` for the decode rows of the current ``Phase``. Every
selector accumulates its statistics into its stage's row of one [L, NUM_STATS]
device table, which the metrics read with one device-to-host copy.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from lynx_sglang.runtime.selection.config import (
    DEFAULT_REFILL_SIMILARITY, PEER_POLICIES, ConfigError, LynxPolicy, RouterSpec, router_family,
)
from lynx_sglang.runtime.expert_parallel.global_selection import GlobalExpertSelector
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement, home_rank, rank_tables
from lynx_sglang.runtime.expert_parallel.rank_aware import RankAwareSelector, physical_ids
from lynx_sglang.runtime.selection.model_identity import check_identity, model_identity
from lynx_sglang.runtime.selection.selector import ExpertSelector
from lynx_sglang.runtime.selection.similarity import load_similarity
from lynx_sglang.runtime.selection.stats import NUM_STATS, SelectionStats
from lynx_sglang.runtime.sglang.options import LynxOptions, default_similarity_path
from lynx_sglang.runtime.sglang.phase import Phase
from lynx_sglang.runtime.sglang.phase import current as current_phase
from lynx_sglang.runtime.sglang.residency import layer_output_norms, paged_expert_slots

logger = logging.getLogger(__name__)

# Attribute name of the stage on SGLang's TopK module.
STAGE_ATTR = "_lynx_stage"

# Expert-count fields of the HF configs SGLang's MoE models use.
_EXPERT_COUNT_FIELDS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")


@dataclass(frozen=True)
class EpLayout:
    """How this process's MoE layers are spread over expert-parallel ranks.

    num_ranks / rank: the EP group; group: its torch.distributed group (global selection only).
    global_votes: each rank routes only its own tokens (DeepEP-family a2a), so the kept set is
        decided on the global batch (``GlobalExpertSelector``).
    a2a_home: our all-to-all dispatcher is in use, so every row has a home rank
        (``expert_parallel.home_rank``) that the rank-aware policy counts traffic from.
    """

    num_ranks: int = 1
    rank: int = 0
    group: object = None
    global_votes: bool = False
    a2a_home: bool = False


class TopKSelectionStage:
    """One MoE layer's selection stage: owns the layer's ``ExpertSelector``."""

    def __init__(self, layer_id: int, router: RouterSpec, options: LynxOptions, device: torch.device,
                 correction_bias: Optional[torch.Tensor], physical_ids: bool = False,
                 ep: EpLayout = EpLayout(), output_type: Optional[type] = None,
                 stats: Optional[torch.Tensor] = None, similarity: Optional[torch.Tensor] = None,
                 expert_slot: Optional[torch.Tensor] = None,
                 output_norms: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """``output_type``: the top-k output class (default SGLang's ``StandardTopKOutput``; the GPU
        hook check, where SGLang cannot be imported, passes a NamedTuple with its fields).

        ``stats``: the contiguous int64 [NUM_STATS] device row the layer's selector accumulates into
        (``build_stages`` hands out rows of one [L, NUM_STATS] table, read with one device-to-host
        copy per metrics interval); None: a row of its own. Every selector this stage plans (also a
        re-plan for new dtypes) accumulates into this same row, which captured graphs write to.

        ``similarity``: policy sere, this layer's [E, E] expert similarity (``build_stages`` loads the file).

        ``expert_slot``: a paged-experts layer under ``--lynx-residency keep|prefer``: SGLang's
        ``DeviceResidency.expert_slot`` of the layer (``residency.paged_expert_slots``), handed to every
        selector this stage plans, which reads it each step (never writes it). None: not paged.

        ``output_norms``: such a layer's output-norm head (``residency.layer_output_norms``), with which its
        page budget ranks by predicted output share; ``__call__`` then needs the block's hidden states."""
        self.layer_id, self.router, self.options = layer_id, router, options
        self.similarity = similarity
        self.expert_slot = expert_slot
        self.output_norms = output_norms
        self.device, self.correction_bias = device, correction_bias
        # EPLB (or a non-trivial placement) has turned the routed ids into physical replica ids:
        # selection then runs on logical ids (what the router ranked) and maps back (_select_physical).
        self.physical_ids = physical_ids
        self.ep = ep
        self.placement = self._placement()
        if output_type is None:
            from sglang.srt.layers.moe.topk import StandardTopKOutput as output_type

        self._standard = output_type  # resolved once: __call__ runs on every MoE layer
        if stats is None:
            stats = torch.zeros(NUM_STATS, dtype=torch.int64, device=device)
        self.stats = stats
        self._warned = set()
        # With one token the score base B is 1, so every pick clears lynx's threshold: the step changes nothing
        # (docs/policies.md). Not so for residency (it may move a lone token's picks), rank-aware lynx_ep,
        # oea or the peers; and a global vote must be joined whatever the local batch.
        policy = options.make_policy(layer_id)
        self._single_token_noop = type(policy) is LynxPolicy and policy.residency == "off" and not ep.global_votes
        if options.min_batch and ep.global_votes:
            raise ConfigError("--lynx-min-batch cannot go with global selection (DeepEP): every rank must join "
                              "each step's vote whatever its own batch size")
        # SGLang's top-k hands int32 ids on GPUs but int64 on the CPU server (seen there: every layer re-planned
        # on its first decode step). With --lynx-torch-compile a re-plan compiles again, so plan for int64 there.
        cpu_compile = options.torch_compile and torch.device(device).type == "cpu"
        self.selector = self._plan(torch.int64 if cpu_compile else torch.int32, torch.float32)
        self.mixed_batches = 0  # mixed prefill+decode batches whose decode rows were selected on (host count)

    def _placement(self):
        """This layer's expert placement over the EP ranks (None without expert parallelism)."""
        if self.ep.num_ranks < 2:
            return None
        if self.physical_ids:
            return ExpertPlacement.from_physical_map(eplb_maps(self.layer_id).physical_to_logical, self.ep.num_ranks,
                                                     self.router.num_experts).to(self.device)
        return ExpertPlacement.contiguous(self.router.num_experts, self.ep.num_ranks, self.device)

    @property
    def rank_aware(self) -> bool:
        """Whether the policy is the rank-aware ``lynx_ep``."""
        return self.options.policy == "lynx_ep"

    def _plan(self, ids_dtype, weights_dtype) -> ExpertSelector:
        """A selector for these dtypes that accumulates into ``self.stats`` (never reallocated or zeroed
        here: a re-plan keeps counting where the previous selector, and any captured graph, did)."""
        policy = self.options.make_policy(self.layer_id)  # a calibration plan: this layer's own parameters
        common = (self.router, policy, self.options.max_batch, self.device, ids_dtype, weights_dtype)
        if self.expert_slot is not None and (self.ep.global_votes or self.rank_aware):
            raise ConfigError("--lynx-residency cannot run with expert parallelism (SGLang's paged experts runs on "
                              "a single GPU)")
        if self.ep.global_votes:
            if self.options.policy in PEER_POLICIES:
                raise ConfigError(_peer_global_refusal(self.options.policy))
            return GlobalExpertSelector(*common, correction_bias=self.correction_bias, group=self.ep.group,
                                        stats=self.stats, similarity=self.similarity)
        if self.rank_aware:
            if self.placement is None:
                raise ConfigError("--lynx-policy lynx_ep needs expert parallelism (--ep-size >= 2); "
                                  "use lynx on a single expert-parallel rank")
            return RankAwareSelector(*common, correction_bias=self.correction_bias,
                                     rank_mask=self.placement.logical_on_rank(), stats=self.stats)
        selector = ExpertSelector(*common, correction_bias=self.correction_bias, stats=self.stats,
                                  similarity=self.similarity, residency=self.expert_slot,
                                  output_norms=self.output_norms)
        if self.options.torch_compile and selector.backend == "torch":
            t0 = time.monotonic()
            try:
                selector.compile_step()
                logger.info("lynx-sglang layer %s: selection step compiled (torch.compile, %.1f s)", self.layer_id,
                            time.monotonic() - t0)
            except RuntimeError as e:  # a missing C++ compiler must not stop the server: eager is correct
                self._warn_once("compile", f"--lynx-torch-compile: {e}; this layer runs the step eagerly")
        return selector

    def _participates(self, phase: Optional[Phase]) -> bool:
        """Global selection: all EP ranks run it together or none does (its all-reduce must match)."""
        if phase is None or not (phase.is_decode or phase.is_idle):
            return False
        from sglang.srt.layers.dp_attention import get_is_extend_in_batch

        return not get_is_extend_in_batch()  # the same on every rank: any extend anywhere skips the step

    def run_without_tokens(self) -> None:
        """Join the step's global vote reduction from a rank that routes no tokens."""
        if self.ep.global_votes and self._participates(current_phase()):
            kt = self.router.total_slots
            self.selector.run(torch.empty(0, self.router.num_experts, device=self.device),
                              torch.empty(0, kt, dtype=self.selector.ids_dtype, device=self.device),
                              torch.empty(0, kt, dtype=self.selector.weights_dtype, device=self.device))

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("lynx-sglang layer %s: %s", self.layer_id, msg)

    def _pass_through(self, topk_output):
        """Leave this batch unchanged; under global selection still join the step's vote reduction, which the
        other EP ranks run whatever this rank's batch looks like."""
        self.run_without_tokens()
        return topk_output

    def __call__(self, topk_output, num_token_non_padded: Optional[torch.Tensor],
                 hidden_states: Optional[torch.Tensor] = None):
        """Rewrite ``topk_output`` for the decode rows of the current batch. ``hidden_states``: the MoE block's
        input [T, H] (what ``TopK.forward`` received); read only by a layer planned with output norms."""
        phase = current_phase()
        if self.ep.global_votes:
            if not self._participates(phase):
                return topk_output
        elif phase is None or phase.is_idle:
            return topk_output
        if not isinstance(topk_output, self._standard):
            self._warn_once("format", f"top-k output {type(topk_output).__name__} is not rewritten (passes through)")
            return self._pass_through(topk_output)
        w, ids, logits = topk_output.topk_weights, topk_output.topk_ids, topk_output.router_logits
        T = ids.shape[0]
        if phase.is_mixed:
            n = phase.decode_rows
            if n > T:
                self._warn_once("mixed", f"mixed batch reports {n} decode tokens of {T}; passes through")
                return self._pass_through(topk_output)
            first, num_valid = T - n, None
            self.mixed_batches += 1
        else:
            first, num_valid = 0, num_token_non_padded
        n_rows = T - first
        if n_rows == 0 and not self.ep.global_votes:
            return topk_output
        if n_rows == 1 and self._single_token_noop:  # lynx leaves a lone token as it is: skip the work
            return topk_output
        if n_rows < self.options.min_batch:  # static per captured graph: T is the graph's padded batch size
            return topk_output
        if n_rows > self.options.max_batch:
            self._warn_once("size", f"decode batch of {n_rows} tokens exceeds --lynx-max-batch "
                                    f"{self.options.max_batch}; such batches pass through")
            return self._pass_through(topk_output)
        if (ids.dtype, w.dtype) != (self.selector.ids_dtype, self.selector.weights_dtype):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("lynx-sglang: top-k dtypes changed during CUDA-graph capture")
            logger.info("lynx-sglang layer %s: top-k arrives as ids %s / weights %s: re-planning the selector",
                        self.layer_id, ids.dtype, w.dtype)
            self.selector = self._plan(ids.dtype, w.dtype)
        # The selector's per-step inputs beyond the batch: lynx_ep's ranks, a paged layer's hidden states.
        step_args = self._rank_args(T, first, ids) if self.rank_aware else {}
        if self.output_norms is not None:
            if hidden_states is None:
                raise RuntimeError(f"lynx-sglang layer {self.layer_id}: output norms need the MoE block's hidden "
                                   f"states, which TopK.forward did not receive")
            step_args["hidden_states"] = hidden_states[first:]
        if self.physical_ids:
            new_ids, new_w = self._select_physical(logits[first:], ids[first:], w[first:], num_valid, step_args)
        else:
            new_ids, new_w = self.selector.run(logits[first:], ids[first:], w[first:], num_valid, **step_args)
        if first:
            new_ids = torch.cat([ids[:first], new_ids])
            new_w = torch.cat([w[:first], new_w])
        return self._standard(topk_weights=new_w, topk_ids=new_ids, router_logits=logits)


    def _rank_args(self, T: int, first: int, ids: torch.Tensor) -> dict:
        """lynx_ep's per-step inputs: the home rank of each row (with our dispatcher) and pick ranks."""
        args = {}
        if self.ep.a2a_home:
            args["home"] = home_rank(T, self.ep.num_ranks, ids.device)[first:]
        if self.physical_ids:  # with replicas the rank of a pick is its physical slot's
            routed = ids[first:, : self.router.top_k].long()
            rank = self.placement.rank_of[routed.clamp(min=0)]
            args["pick_rank"] = torch.where(routed >= 0, rank, torch.full_like(rank, -1))
        return args

    def _select_physical(self, logits, ids, w, num_valid, step_args=None):
        """Selection when ids are physical (EPLB): decide on logical ids, map the result back.

        Slots whose logical expert is unchanged keep the physical replica SGLang
        chose, so unchanged rows stay bit for bit. A slot that was re-routed gets
        a replica of its new logical expert picked by row index (as SGLang's
        rank-invariant dynamic dispatch does), valid with and without an
        all-to-all backend. Empty slots stay -1: the remap tables would alias -1.
        """
        maps = eplb_maps(self.layer_id)
        physical_to_logical = maps.physical_to_logical
        k = self.router.top_k
        routed = ids[:, :k]
        logical = torch.where(routed >= 0, physical_to_logical[routed.clamp(min=0).long()].to(ids.dtype), routed)
        if self.rank_aware:
            self._refresh_rank_tables(physical_to_logical)
        new_ids, new_w = self.selector.run(logits, torch.cat([logical, ids[:, k:]], dim=1), w, num_valid,
                                           **(step_args or {}))
        new_logical = new_ids[:, :k]
        target = new_logical.clamp(min=0).long()
        if self.rank_aware:  # the replica on the rank lynx_ep chose for the slot
            replica = physical_ids(new_logical, self.selector.last_slot_rank, self._replica_table).to(ids.dtype)
        else:
            row = torch.arange(ids.shape[0], device=ids.device)[:, None]
            replica = maps.logical_to_all[target, row % maps.replicas[target]].to(ids.dtype)
        physical = torch.where(new_logical == logical, routed, torch.where(new_logical >= 0, replica, new_logical))
        return torch.cat([physical, ids[:, k:]], dim=1), new_w


    def _refresh_rank_tables(self, physical_to_logical: torch.Tensor) -> None:
        """lynx_ep under EPLB: re-read which ranks hold each expert from the live map (rebalancing
        rewrites it in place), into the selector's rank mask and our replica table, without a sync."""
        if getattr(self, "_replica_table", None) is None:
            self._replica_table = torch.empty_like(self.selector.rank_mask, dtype=torch.long)
        rank_tables(physical_to_logical, self.placement.rank_of, self.selector.rank_mask, self._replica_table)


class EplbMaps(NamedTuple):
    """One layer's EPLB placement, as SGLang's ``ExpertLocationMetadata`` holds it (device tensors)."""

    physical_to_logical: torch.Tensor  # [P]: the logical expert of each physical slot
    logical_to_all: torch.Tensor  # [E, X]: every physical slot of each logical expert (-1 padded)
    replicas: torch.Tensor  # [E]: how many of those are valid


def eplb_maps(layer_id: int) -> EplbMaps:
    """This layer's EPLB maps.

    Read on every call: EPLB rebalancing rewrites the placement (in place, so
    that captured CUDA graphs see it too).
    """
    from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

    md = get_global_expert_location_metadata()
    return EplbMaps(md.physical_to_logical_map[layer_id], md.logical_to_all_physical_map[layer_id],
                    md.logical_to_all_physical_map_num_valid[layer_id])


# ----------------------------------------------------------------------------- plan after load

def num_routed_experts(hf_config) -> int:
    """E from a Hugging Face MoE config (clear error when the model has no such field)."""
    for name in _EXPERT_COUNT_FIELDS:
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(hf_config, "text_config", None)
    if text_config is not None and text_config is not hf_config:
        return num_routed_experts(text_config)
    raise ConfigError(f"--moe-backend lynx: cannot find the expert count in the model config "
                      f"(looked for {', '.join(_EXPERT_COUNT_FIELDS)})")


def _peer_global_refusal(policy: str) -> str:
    return (f"--lynx-policy {policy} cannot run with a DeepEP-family --moe-a2a-backend: there each rank routes "
            f"only its own tokens and the batch decision must be reduced over ranks, which only the policies "
            f"off, lynx, oea and budget support (their votes are sums); use --moe-a2a-backend none or lynx")


def layer_similarities(hf_config, options: LynxOptions, layer_ids: Sequence[int]) -> dict:
    """Policy sere (or lynx with refill_similarity): every listed layer's [E, E] similarity from ``options.similarity``, checked against the
    served model (``similarity.load_similarity``: format, model identity, expert count, values, layers)."""
    if options.similarity is None:
        raise ConfigError(f"--lynx-policy {options.policy} (as configured) needs an expert-similarity file: pass "
                          "--lynx-sere-similarity PATH "
                          "(written by python -m lynx_sglang.sere_calibrate; the default, "
                          "<model path>/sere_similarity.safetensors, applies only to a local model folder)")
    loaded = load_similarity(options.similarity, model_identity(hf_config), layer_ids)
    logger.info("lynx-sglang: expert similarity from %s (method %s, %d layers)", options.similarity, loaded.method,
                len(loaded.matrices))
    return {layer: loaded.matrices[layer] for layer in layer_ids}


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def router_scoring(topk_config) -> str:
    """The scoring function SGLang's router really applies (not always ``topk_config.scoring_func``).

    With grouped top-k and a correction bias SGLang routes through ``biased_grouped_topk``, which is
    sigmoid whatever ``scoring_func`` says; glm4_moe leaves ``scoring_func`` at its "softmax" default
    there, so trusting the field ranked refills by the wrong score and barely selected anything.
    """
    if topk_config.use_grouped_topk and topk_config.correction_bias is not None:
        return "sigmoid"
    return topk_config.scoring_func


def build_stages(model, hf_config, options: LynxOptions, physical_ids: bool = False,
                 ep: EpLayout = EpLayout()) -> list[TopKSelectionStage]:
    """Attach a selection stage to every TopK layer ``options`` enables; refuse what we cannot serve."""
    from sglang.srt.layers.moe.hash_topk import HashTopK
    from sglang.srt.layers.moe.topk import TopK, TopKOutputFormat

    if torch.version.hip is not None:
        raise ConfigError("--moe-backend lynx is not supported on ROCm: a row left without a kept expert gets "
                          "id -1, which SGLang's aiter MoE kernels cannot take")
    if ep.global_votes and options.policy in PEER_POLICIES:
        raise ConfigError(_peer_global_refusal(options.policy))
    E = num_routed_experts(hf_config)
    device = _model_device(model)
    stages, planned, hashed = [], [], 0
    moe_layer_ids = []  # every (non-draft) TopK layer of the model, enabled or not: a calibration plan covers all
    for module in model.modules():
        if isinstance(module, HashTopK):
            hashed += 1
            continue
        if not isinstance(module, TopK):
            continue
        missing = [a for a in ("topk_config", "is_draft", "enable_waterfill") if not hasattr(module, a)]
        if missing:  # an SGLang rename: what these attributes decide must not default to "admitted"
            raise ConfigError(f"--moe-backend lynx: SGLang's TopK has no {missing[0]!r}; cannot check that this "
                              f"layer is one we can serve, refusing rather than risk wrong results")
        cfg = module.topk_config
        layer_id = getattr(module, "layer_id", None)
        if layer_id is None:
            layer_id = cfg.layer_id
        if module.is_draft:
            # A speculative draft model's MoE (MTP): its batches are speculative, which we leave alone, and its
            # layer ids lie past the target model's (EPLB maps do not cover them).
            continue
        moe_layer_ids.append(layer_id)
        if not options.layer_enabled(layer_id):
            continue
        if "forward" in module.__dict__:
            raise ConfigError(f"--moe-backend lynx: the model replaces TopK.forward on layer {layer_id} (for "
                              f"example with forward_native), so our hook would never run; not supported")
        if module.enable_waterfill:
            raise ConfigError(f"--moe-backend lynx does not support waterfill shared experts (layer {layer_id}): "
                              f"they widen top-k and remap ids per rank after routing")
        if cfg.fused_gate_packed_ids:
            raise ConfigError(f"--moe-backend lynx cannot rewrite packed top-k ids (layer {layer_id}, the fused "
                              f"MXFP4 gate); choose a MoE runner with standard top-k output")
        if cfg.output_format in (TopKOutputFormat.BYPASSED, TopKOutputFormat.TRITON_KERNEL):
            raise ConfigError(
                f"--moe-backend lynx cannot rewrite top-k for the MoE runner in use "
                f"(top-k format {cfg.output_format.name}, layer {layer_id}); choose a runner with "
                f"standard top-k output (for example --moe-runner-backend triton)")
        if cfg.custom_routing_function is not None:
            raise ConfigError(f"--moe-backend lynx: layer {layer_id} uses a custom routing function, "
                              f"whose ranking expert selection cannot reproduce")
        shared = cfg.num_shared_topk_slots
        router = RouterSpec(E, cfg.top_k - shared, shared, router_scoring(cfg), cfg.correction_bias is not None)
        bias = cfg.correction_bias.detach().float() if cfg.correction_bias is not None else None
        planned.append((module, layer_id, router, bias))
    if options.calibration is not None:  # refused here, before any stage is attached
        check_calibration(hf_config, options, moe_layer_ids, [(layer_id, router) for _, layer_id, router, _ in planned])
    # Policy sere: one file for every layer, read once, refused here (start-up) if it does not fit the model.
    sims = (layer_similarities(hf_config, options, [layer_id for _, layer_id, _, _ in planned])
            if options.uses_similarity and planned else {})
    # --lynx-residency: each paged layer's device residency (SGLang's, read-only), refused here if unusable.
    slots = paged_expert_slots(model, options, [(layer_id, router) for _, layer_id, router, _ in planned], device)
    norms = layer_output_norms(hf_config, options, slots)  # --lynx-residency-output-norms, refused here if unusable
    # Every layer's statistics in one [L, NUM_STATS] table: the metrics read it with one copy per interval.
    table = torch.zeros(len(planned), NUM_STATS, dtype=torch.int64, device=device)
    for row, (module, layer_id, router, bias) in enumerate(planned):
        stage = TopKSelectionStage(layer_id, router, options, device, bias, physical_ids=physical_ids, ep=ep,
                                   stats=table[row], similarity=sims.get(layer_id), expert_slot=slots.get(layer_id),
                                   output_norms=norms.get(layer_id))
        object.__setattr__(module, STAGE_ATTR, stage)  # a plain attribute, not a registered submodule
        stages.append(stage)
    if hashed:
        logger.warning("lynx-sglang: %d hash-routed MoE layer(s) (HashTopK) are left unchanged", hashed)
    if not stages:
        logger.warning("lynx-sglang: --moe-backend lynx found no MoE layer to select on")
    if options.layer_params is not None:
        src = (options.calibration or {}).get("file", "the per-layer plan")
        for layer_id in sorted(options.layer_params):
            logger.info("lynx-sglang: layer %s: %s (from %s)", layer_id,
                        "selection off" if options.layer_params[layer_id] is None else options.make_policy(layer_id),
                        src)
    else:
        families = sorted({router_family(router) for _, _, router, _ in planned})
        logger.info("lynx-sglang: %s policy on %d MoE layer(s); router: %s; in effect: %s%s", options.policy,
                    len(stages), "; ".join(families) or f"E={E}", options.make_policy(),
                    f" (preset {options.preset})" if options.preset else "")
        if options.policy == "lynx":
            logger.info("lynx-sglang: lynx uses one accuracy-cost default for every router family (moved-weight "
                        "cap %.2f: docs/policies.md, 'Defaults across router families'); for a stated accuracy "
                        "budget per model: python -m lynx_sglang.calibrate", options.make_policy().max_moved_weight)
    return stages


def with_default_refill(options: LynxOptions, model_path) -> LynxOptions:
    """lynx with no explicit refill setting: refill by expert similarity (``DEFAULT_REFILL_SIMILARITY``) when
    the similarity file sits beside the model, on every device (both backends refill by similarity: on
    CUDA the Triton kernels, at one [E] bias-row load per freed slot, no extra launch). Logged either way;
    a file made for another model is refused later."""
    if (options.policy != "lynx" or options.layer_params is not None or "refill_similarity" in options.params
            or options.similarity is not None):
        return options
    path = default_similarity_path(model_path)
    if path is None or not os.path.isfile(path):
        logger.info("lynx-sglang: no expert-similarity file beside the model: moved picks refill by router score "
                    "(python -m lynx_sglang.sere_calibrate <model> writes one; docs/policies.md)")
        return options
    logger.info("lynx-sglang: refilling moved picks by expert similarity (refill_similarity %g) from %s",
                DEFAULT_REFILL_SIMILARITY, path)
    return replace(options, params={**options.params, "refill_similarity": DEFAULT_REFILL_SIMILARITY},
                   similarity=path)


def check_calibration(hf_config, options: LynxOptions, moe_layer_ids: Sequence[int], planned) -> None:
    """Refuse (ConfigError) a calibration file made for another model: its model identity, its MoE layers
    (the file must give every MoE layer of the model a setting, and no other layer), and E, routed top-k
    and the router's scoring function of every layer selection runs on (``planned``: (layer_id, RouterSpec))."""
    cal = options.calibration
    what = f"calibration file {cal.get('file', '?')}"
    check_identity(cal.get("identity") or {}, model_identity(hf_config), what)
    file_layers, model_layers = sorted(options.layer_params or {}), sorted(set(moe_layer_ids))
    if file_layers != model_layers:
        extra, missing = sorted(set(file_layers) - set(model_layers)), sorted(set(model_layers) - set(file_layers))
        raise ConfigError(f"{what} does not fit the model's MoE layers {model_layers}: "
                          + "; ".join(([f"it has settings for layer(s) {extra} the model has no MoE on"] if extra else [])
                                      + ([f"it has no setting for layer(s) {missing}"] if missing else [])))
    for layer_id, router in planned:
        for name, found, served in (("num_experts", cal.get("num_experts"), router.num_experts),
                                    ("top_k", cal.get("top_k"), router.top_k),
                                    ("scoring", cal.get("scoring"), router.scoring_func)):
            if found != served:
                raise ConfigError(f"{what} was made for another model: {name} is {found!r} there, {served!r} on "
                                  f"layer {layer_id} of the model being served")


@dataclass(frozen=True)
class StatsSnapshot:
    """One host copy of every registered stage's statistics.

    ``resets``: how often the statistics were zeroed so far (``StageRegistry.reset_stats``); a reader
    whose previous snapshot has another count must take these values as counted from zero.
    """

    resets: int
    layers: dict  # layer id -> SelectionStats
    mixed_batches: dict  # layer id -> mixed prefill+decode batches selected on (host counts)


class StageRegistry:
    """The selection stages of this process's model (empty unless --moe-backend lynx).

    Owns the read side of their statistics: the rows the stages' selectors accumulate into are
    rows of the [L, NUM_STATS] table ``build_stages`` allocated, so ``snapshot`` reads all layers
    with one device-to-host copy (stages from elsewhere are stacked first: still one copy).
    """

    def __init__(self, stages: Sequence[TopKSelectionStage] = ()):
        self._stages: list[TopKSelectionStage] = []
        self.resets = 0
        self.add(stages)

    def add(self, stages: Sequence[TopKSelectionStage]) -> None:
        """Register ``stages`` (in layer order; a model's ``build_stages`` result)."""
        self._stages.extend(stages)
        rows = [s.stats for s in self._stages]
        base = rows[0]._base if rows and rows[0]._base is not None else None
        # The common case: the stages are exactly the rows of one table, in order.
        self._table = base if (base is not None and base.dim() == 2 and base.shape[0] == len(rows)
                               and all(r._base is base and r.data_ptr() == base[i].data_ptr()
                                       for i, r in enumerate(rows))) else None

    def __iter__(self):
        return iter(list(self._stages))

    def __len__(self) -> int:
        return len(self._stages)

    def __bool__(self) -> bool:
        return bool(self._stages)

    def _host_rows(self) -> list:
        """Every stage's statistics row on the host: one device-to-host copy."""
        if not self._stages:
            return []
        table = self._table if self._table is not None else torch.stack([s.stats for s in self._stages])
        return table.tolist()

    def snapshot(self) -> StatsSnapshot:
        """All layers' statistics (one device-to-host copy), and the reset count they belong to."""
        rows = self._host_rows()
        return StatsSnapshot(self.resets,
                             {s.layer_id: SelectionStats.from_values(r) for s, r in zip(self._stages, rows)},
                             {s.layer_id: s.mixed_batches for s in self._stages})

    def reset_stats(self) -> None:
        """Zero every stage's statistics in place (captured graphs keep adding to the same rows) and
        count the reset, so that readers rebase instead of seeing totals go backwards."""
        for s in self._stages:
            s.stats.zero_()
            s.mixed_batches = 0
        self.resets += 1


_registry = StageRegistry()


def stages() -> list[TopKSelectionStage]:
    """The selection stages of this process's model (empty unless --moe-backend lynx)."""
    return list(_registry)


def registry() -> StageRegistry:
    """This process's stage registry."""
    return _registry


def prepare(model, hf_config, options: LynxOptions, server_args) -> list[TopKSelectionStage]:
    """Refuse what this process cannot serve, then build and register the stages of ``model``.

    ``server_args``: SGLang's ``ServerArgs`` of this process (``server_args_of_process()``), or any
    object with the fields ``refusal`` reads (tests); the refusals are decided from it.
    """
    check_supported(server_args)
    auto = with_default_refill(options, getattr(server_args, "model_path", None))
    if auto is not options:
        # The refill was not asked for: a file that does not fit this model is a warning and plain lynx
        # (a file given with --lynx-sere-similarity, or a refill asked for, is refused at start-up instead).
        try:
            load_similarity(auto.similarity, model_identity(hf_config), ())
            options = auto
        except ConfigError as e:
            logger.warning("lynx-sglang: not using the similarity file beside the model (%s); moved picks refill "
                           "by router score", e)
    if options.uses_similarity and options.similarity is None:  # Engine API users: the default beside the model
        options = replace(options, similarity=default_similarity_path(getattr(server_args, "model_path", None)))
    built = build_stages(model, hf_config, options, physical_ids=_eplb_remaps_ids(), ep=_ep_layout(options))
    _registry.add(built)
    return built


# ----------------------------------------------------------------------------- refusals

class _Unreadable(Exception):
    pass


def _field(cfg, name: str, kind: type):
    """``cfg.name`` as ``kind``; a missing field or an unexpected type raises ``_Unreadable``."""
    if not hasattr(cfg, name):
        raise _Unreadable(f"server args have no field {name!r}")
    value = getattr(cfg, name)
    if kind is int and value is None:
        value = 1  # SGLang's unset parallel sizes mean 1
    if kind is str and value is None:
        value = "none"
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise _Unreadable(f"server arg {name} is {value!r}, expected {kind.__name__}")


def _resolved(server_args):
    """A read view of ``server_args`` with SGLang's resolution declarations applied (resolution can widen
    attention DP or change the a2a backend after parsing); a plain namespace reads as it is."""
    from sglang.srt.arg_groups.model_override_base import resolving_view

    return resolving_view(server_args)


def refusal(server_args) -> Optional[str]:
    """Why ``--moe-backend lynx`` cannot serve this configuration, or None.

    Decided from the parsed (and, in a worker, resolved) server args, never from a best-effort read
    of live state: a field that is missing or of an unexpected type (an SGLang rename) is a refusal
    with the reason, not an admission.

    - ``enable_two_batch_overlap``: both micro-batches would share one layer's selection buffers.
    - attention DP (``attn_dp_size`` > 1, or the deprecated ``--dp-size N --enable-dp-attention``)
      with ``moe_a2a_backend`` ``none`` (and no DWDP, ``dwdp_size`` <= 1): each rank's MoE then sees
      every DP rank's rows gathered, while decode/prefill is known only for its own. (Configurations
      whose MoE input SGLang scatters by other means, e.g. flashinfer-cutlass FP4 all-gather, are
      refused too: we do not decide that from the arguments.)
    """
    try:
        cfg = _resolved(server_args)
        if _field(cfg, "enable_two_batch_overlap", bool):
            return ("--moe-backend lynx does not support --enable-two-batch-overlap yet (both micro-batches "
                    "would share one layer's selection buffers)")
        attn_dp = _field(cfg, "attn_dp_size", int)
        if _field(cfg, "enable_dp_attention", bool):  # the deprecated spelling, before resolution rewrites it
            attn_dp = max(attn_dp, _field(cfg, "dp_size", int))
        a2a = _field(cfg, "moe_a2a_backend", str)
        dwdp = _field(cfg, "dwdp_size", int)
    except _Unreadable as e:
        return (f"--moe-backend lynx cannot tell whether this SGLang configuration is supported ({e}); "
                f"refusing rather than risk wrong results")
    except Exception as e:  # noqa: BLE001  the resolution view itself failed: an SGLang we do not know
        return (f"--moe-backend lynx cannot read SGLang's server args ({type(e).__name__}: {e}); "
                f"refusing rather than risk wrong results")
    if attn_dp > 1 and a2a == "none" and dwdp <= 1:
        return ("--moe-backend lynx with attention DP (--attn-dp-size > 1) needs a DeepEP-family "
                "--moe-a2a-backend: with a2a none each rank's MoE sees every DP rank's rows "
                "gathered, while decode/prefill is known only for its own")
    return None


def check_supported(server_args) -> None:
    """Raise ConfigError with ``refusal``'s reason if this configuration cannot be served."""
    reason = refusal(server_args)
    if reason is not None:
        raise ConfigError(reason)


def server_args_of_process():
    """This process's ServerArgs as SGLang published it (a scheduler/TP worker); ConfigError if there
    are none (then nothing can be decided, and we refuse)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        args = get_server_args()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--moe-backend lynx cannot read this process's server args "
                          f"({type(e).__name__}: {e}); refusing rather than risk wrong results") from e
    if args is None:
        raise ConfigError("--moe-backend lynx: SGLang published no server args in this process; refusing "
                          "rather than risk wrong results")
    return args


def _ep_layout(options: LynxOptions) -> EpLayout:
    """This process's expert-parallel layout, from SGLang's parallel state."""
    from sglang.srt.layers.moe.utils import is_deepep_class_backend
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    n, rank = int(par.moe_ep_size), int(par.moe_ep_rank)
    if n < 2:
        return EpLayout()
    global_votes = bool(is_deepep_class_backend())
    group = None
    if global_votes:
        from sglang.srt.distributed.parallel_state import get_moe_ep_group

        group = get_moe_ep_group().device_group
    return EpLayout(num_ranks=n, rank=rank, group=group, global_votes=global_votes,
                    a2a_home=options.a2a_backend == "lynx")


def _eplb_remaps_ids() -> bool:
    """Whether EPLB turns top-k ids into physical expert ids in this process."""
    from sglang.srt.layers.moe.topk import is_expert_remapping_enabled

    return bool(is_expert_remapping_enabled())
