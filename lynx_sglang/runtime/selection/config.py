"""Configuration of expert selection: what the router looks like and which policy runs.

Everything here is validated once, at configuration time, so that a bad value
stops start-up with a clear message instead of failing inside a kernel.
"""

from __future__ import annotations

import math
import functools
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Union

SCORING_FUNCS = ("softmax", "sigmoid")

# Kernel tiles hold one row of logits and one row of picks; these bound them.
MAX_EXPERTS = 1024
# The Triton kernels are compiled and checked (kernels/aot_check.py, sm_90) up to this many experts: at
# E_PAD 512 the keep kernel spills registers. Larger routers (e.g. Kimi-K2's 384) run the torch backend,
# which is capture-safe too (tests/test_no_sync.py).
MAX_KERNEL_EXPERTS = 256
MAX_ROUTED_TOP_K = 16
MAX_BETA = 7
# Weights and weight fractions compared in integer units of 1/WEIGHT_Q, so comparisons are exact and
# independent of summation order (kernels and reference alike).
WEIGHT_Q = 65536
# Integer scores of the lynx policy must fit in int64: see LynxPolicy.validate.
_INT64_BITS = 62
# lynx's residency-aware modes on SGLang's paged-experts layers (LynxPolicy.residency; docs/offload.md).
RESIDENCY_MODES = ("off", "keep", "prefer")


class ConfigError(ValueError):
    """A configuration that expert selection cannot serve; raised before any kernel runs."""


@dataclass(frozen=True)
class RouterSpec:
    """The shape and semantics of one MoE layer's router.

    num_experts: routed experts E (width of the router logits).
    top_k: routed picks per token (not counting fused shared-expert slots).
    num_shared_slots: trailing columns of ``topk_ids`` that hold fused shared
        experts; selection never reads or changes them.
    scoring_func: ``softmax`` or ``sigmoid`` (how logits become gate weights).
    has_correction_bias: the router ranks experts by ``score + bias``
        (DeepSeek-V3 style) while gate weights use the unbiased score.

    Whether the router renormalises its top-k weights does not enter: every
    rewritten row keeps its original routed weight sum, which is 1 (times any
    routed scaling factor) for renormalising routers and the picked probability
    mass for the others.
    """

    num_experts: int
    top_k: int
    num_shared_slots: int = 0
    scoring_func: str = "softmax"
    has_correction_bias: bool = False

    def __post_init__(self):
        if not isinstance(self.num_experts, int) or not 1 <= self.num_experts <= MAX_EXPERTS:
            raise ConfigError(f"num_experts must be an int in [1, {MAX_EXPERTS}], got {self.num_experts!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.top_k > MAX_ROUTED_TOP_K:
            raise ConfigError(f"top_k={self.top_k} exceeds the supported maximum {MAX_ROUTED_TOP_K}")
        if not isinstance(self.num_shared_slots, int) or self.num_shared_slots < 0:
            raise ConfigError(f"num_shared_slots must be a non-negative int, got {self.num_shared_slots!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(
                f"scoring_func {self.scoring_func!r} is not supported by expert selection "
                f"(supported: {', '.join(SCORING_FUNCS)})"
            )

    @property
    def total_slots(self) -> int:
        """Width of ``topk_ids``: routed picks plus shared-expert slots."""
        return self.top_k + self.num_shared_slots


def _check_number(name: str, value, lo: float, hi: float, integer: bool):
    ok_type = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok_type or (not integer and not math.isfinite(value)) or not lo <= value <= hi:
        kind = "an int" if integer else "a finite number"
        raise ConfigError(f"{name} must be {kind} in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class OffPolicy:
    """Return the router's choice unchanged (statistics are still collected)."""

    name = "off"

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        pass


@dataclass(frozen=True)
class LynxPolicy:
    """AffinityBinning (Lynx). See docs/policies.md for the rule and its reasoning.

    alpha: bins per logit of affinity (bin width 1/alpha logits).
    beta: number of bins below the top one; affinities further away share bin -beta.
    keep_level: an expert clears the threshold with ``min_votes`` votes at bin
        >= -keep_level (or the equal score in lower bins). 0 (default): only a row's
        best pick votes, so the kept set is what the moved-weight cap holds plus the
        ``min_keep`` best-voted experts; 1 (the default before session 10) also keeps
        picks within 1/alpha logits of their row's best.
    min_votes: votes needed at that level.
    min_keep: the threshold is lowered until at least this many experts clear it
        (None: top_k, so every token can still fill all its slots).
    confidence_margin: a token whose top-two logits differ by at least this is
        confident and always keeps its rank-0 expert (None: 1/alpha, one bin).
    max_moved_weight: a token's picks may only move while their routed weight,
        counted from its weakest pick up, stays within this fraction of the
        token's routed weight sum; the others are always kept (1.0: no cap). The main
        knob (default 0.35).
    refill_similarity: 0 (default): a moved pick goes to the row's best-scored kept
        expert. > 0: to the kept expert maximising ``score + refill_similarity *
        similarity[moved expert, candidate]`` (SERE's idea: a similar expert is a
        better stand-in), with the layer's expert-similarity file
        (``python -m lynx_sglang.sere_calibrate``); score units are the router's
        ranking score (logits; sigmoid score + bias for biased routers). Both backends
        (the Triton kernels add one [E] bias-row load per freed slot). See docs/peers.md for what it buys.
    residency: on a layer whose experts SGLang pages from host memory
        (``--enable-paged-experts``), how the kept set treats the experts resident in
        the layer's GPU slots before the step (``reference.residency_keep``; a layer that
        is not paged runs plain lynx, bit for bit). ``off`` (default): ignore residency.
        ``keep``: lynx's kept set plus every resident expert some row picked (a resident
        pick never moves; pages in what lynx pages). ``prefer`` (resident-first): the kept
        set is the resident picks plus the picks rows cannot move (lynx's mandatory
        experts: confident rows' best pick, picks the moved-weight cap holds), lynx's kept
        set added back below ``min_keep``. With every expert resident neither mode moves a
        pick. Torch backend only on paged layers. docs/offload.md has the measurements.
    keep_top: every voting row keeps its ``keep_top`` best picks, whatever the cap lets move
        (OEA's per-token guarantee by rank, on top of lynx's by weight; 0: none). None (default):
        ``top_k // 4``, a quarter of each token's picks (2 at k = 8; at k < 8 it is 0 or 1, and 1
        changes nothing at the default ``keep_level`` 0 and ``min_votes`` 1, where a row's best pick
        clears the threshold anyway). Measured in
        docs/peers.md, "Session 10": the same KL at 60-80 % of off's experts, lower past half.
    residency_max_moved_weight: the moved-weight cap on paged layers when ``residency``
        is on (None: ``max_moved_weight``): the knob that trades affinity for fewer
        page-ins (at K = E/4, B = 16: 0.55 with ``prefer`` pages 2.07x fewer than off on
        the bundled qwen3 for 0.04 points; docs/offload.md).
    residency_page_budget: with ``residency`` ``prefer``, a paged layer pages at most this many
        experts per step beyond the rows' best picks (None: no budget). Picks the cap holds
        on non-resident experts are kept by total routed weight (ties to the lower id) until
        the budget is spent; the rest move. A row's best pick never moves, so a step pages
        at most max(budget, its distinct non-resident best picks) experts. It bounds the
        PCIe time of a step: on the bundled models it cuts the 99th percentile of page-ins
        per decode step by 16-25 % at the same mean and accuracy (docs/offload.md).
    """

    name = "lynx"
    alpha: float = 2.0
    beta: int = 3
    # keep_level 0 and cap 0.35 since session 10: at every matched expert count on the three bundled models
    # keep_level 0 had the same or lower KL than 1 and reaches deeper cuts (docs/peers.md, "Session 10").
    keep_level: int = 0
    min_votes: int = 1
    min_keep: Optional[int] = None
    confidence_margin: Optional[float] = None
    max_moved_weight: float = 0.35
    refill_similarity: float = 0.0
    residency: str = "off"
    residency_max_moved_weight: Optional[float] = None
    keep_top: Optional[int] = None
    residency_page_budget: Optional[int] = None

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        _check_number("lynx alpha", self.alpha, 1e-3, 1e3, integer=False)
        if self.keep_top is not None:
            _check_number("lynx keep_top", self.keep_top, 0, router.top_k, integer=True)
        if self.residency not in RESIDENCY_MODES:
            raise ConfigError(f"lynx residency must be one of {', '.join(RESIDENCY_MODES)}, got {self.residency!r}")
        if self.residency_max_moved_weight is not None:
            if self.residency == "off":
                raise ConfigError("lynx residency_max_moved_weight applies only with residency keep or prefer")
            _check_number("lynx residency_max_moved_weight", self.residency_max_moved_weight, 0.0, 1.0,
                          integer=False)
        if self.residency_page_budget is not None:
            if self.residency != "prefer":
                raise ConfigError("lynx residency_page_budget applies only with residency prefer")
            _check_number("lynx residency_page_budget", self.residency_page_budget, 0, router.num_experts,
                          integer=True)
        _check_number("lynx max_moved_weight", self.max_moved_weight, 0.0, 1.0, integer=False)
        _check_number("lynx refill_similarity", self.refill_similarity, 0.0, 1e3, integer=False)
        _check_number("lynx beta", self.beta, 0, MAX_BETA, integer=True)
        _check_number("lynx keep_level", self.keep_level, 0, self.beta, integer=True)
        _check_number("lynx min_votes", self.min_votes, 1, 1 << 16, integer=True)
        if self.min_keep is not None:
            # >= 1 keeps the kept set non-empty, so every re-routed row still holds an expert.
            _check_number("lynx min_keep", self.min_keep, 1, router.num_experts, integer=True)
        if self.confidence_margin is not None:
            _check_number("lynx confidence_margin", self.confidence_margin, 0.0, 1e6, integer=False)
        # Scores are exact integers sum_j votes[e, j] * B**(beta - j) <= B**(beta + 1).
        bits = (self.beta + 1) * math.log2(max(2, max_tokens)) + math.log2(max(1, self.min_votes))
        if bits > _INT64_BITS:
            raise ConfigError(
                f"lynx beta={self.beta} with up to {max_tokens} tokens per batch overflows the "
                f"exact integer expert score; lower beta or the maximum batch size"
            )

    @property
    def margin(self) -> float:
        """Logit margin that makes a token confident."""
        return 1.0 / self.alpha if self.confidence_margin is None else float(self.confidence_margin)

    @property
    def moved_weight_q(self) -> int:
        """``max_moved_weight`` in units of 1/WEIGHT_Q (the comparison is exact in integers)."""
        return int(round(self.max_moved_weight * WEIGHT_Q))

    def resolved_keep_top(self, router: RouterSpec) -> int:
        """Picks every voting row keeps by rank (``keep_top``; None: a quarter of the routed top-k)."""
        return router.top_k // 4 if self.keep_top is None else self.keep_top

    def resolved_min_keep(self, router: RouterSpec) -> int:
        """Minimum number of kept experts per batch."""
        return router.top_k if self.min_keep is None else self.min_keep

    @property
    def paged(self) -> "LynxPolicy":
        """The policy a paged-experts layer runs in residency mode: ``residency_max_moved_weight`` as
        the moved-weight cap (the same object when there is none; made once per policy value)."""
        return _paged_policy(self)


@functools.lru_cache(maxsize=None)
def _paged_policy(policy: LynxPolicy) -> LynxPolicy:
    if policy.residency_max_moved_weight is None:
        return policy
    return replace(policy, max_moved_weight=policy.residency_max_moved_weight, residency_max_moved_weight=None)


@dataclass(frozen=True)
class RankAwareLynxPolicy(LynxPolicy):
    """Lynx for expert parallelism: also cut the ranks a token visits and the busiest rank's experts.

    Under expert parallelism a step costs what the all-to-all moves (a token
    travels once to every other rank holding one of its picks) and what the
    busiest rank runs. Plain lynx shrinks the batch's expert set but a token
    still visits about as many ranks. On top of the lynx keep set (same
    parameters, same votes, mandatory and held experts), this policy:

    1. bounds the kept experts per rank (``rank_slack`` not None): a kept expert
       sits on the lowest rank holding it; a rank may keep at most
       ``ceil((1 + rank_slack) * |keep| / N)``; over-full ranks drop their
       lowest-scoring non-mandatory kept experts (never below ``min_keep`` in all);
    2. per token, frees every pick on a rank other than its home that it visits
       only through weak picks (movable under ``max_moved_weight`` and at a
       level below ``keep_level``) when the kept set can refill every slot this
       frees, and refills freed slots preferring kept experts on ranks the
       token still visits.

    rank_slack: per-rank kept-expert bound above the even share (None: no bound),
        applied in units of 1/WEIGHT_Q.
    keep_level: 1 by default (lynx: 0), the setting its expert-parallel measurements used.
    keep_top: 0 (lynx: a quarter of top-k); refused otherwise.
    max_moved_weight: as for lynx, but 0.3 by default: the rank drops move far more
        rows than lynx does, and on the bundled model 0.3 kept the cost within
        0.35 points at EP = 4 while cutting all-to-all bytes 38 % (0.4: up to
        0.47 points for 45 %; docs/accuracy.md, "Expert parallelism").

    The rule lives in ``lynx_sglang.runtime.expert_parallel.rank_aware`` (it needs the
    expert placement); the Triton kernels do not implement it and
    ``reference.select`` treats it as plain lynx. See docs/policies.md.
    """

    name = "lynx_ep"
    keep_level: int = 1  # its measured setting (docs/accuracy.md); lynx's own default moved to 0 in session 10
    keep_top: Optional[int] = 0  # its rank drops decide which picks a token keeps
    max_moved_weight: float = 0.3
    rank_slack: Optional[float] = 0.25

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        super().validate(router, max_tokens)
        if self.refill_similarity:
            raise ConfigError("lynx_ep does not take refill_similarity (its refill prefers the ranks a token "
                              "already visits)")
        if self.keep_top != 0:
            raise ConfigError("lynx_ep does not take keep_top (its rank drops decide which picks a token keeps)")
        if self.residency != "off" or self.residency_max_moved_weight is not None:
            raise ConfigError("lynx_ep does not take residency (SGLang's paged experts runs on a single GPU, "
                              "lynx_ep needs expert parallelism); use lynx with residency")
        if self.rank_slack is not None:
            _check_number("lynx_ep rank_slack", self.rank_slack, 0.0, 16.0, integer=False)

    @property
    def rank_slack_q(self) -> Optional[int]:
        """``rank_slack`` in units of 1/WEIGHT_Q (the per-rank bound is exact in integers)."""
        return None if self.rank_slack is None else int(round(self.rank_slack * WEIGHT_Q))


@dataclass(frozen=True)
class OeaPolicy:
    """Opportunistic Expert Activation: keep each token's top-k0, fill from the batch's union.

    k0: picks every token keeps (None: ceil(top_k / 2)).
    """

    name = "oea"
    k0: Optional[int] = None

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        if self.k0 is not None:
            _check_number("oea k0", self.k0, 1, router.top_k, integer=True)

    def resolved_k0(self, router: RouterSpec) -> int:
        """Picks each token always keeps."""
        return (router.top_k + 1) // 2 if self.k0 is None else self.k0


@dataclass(frozen=True)
class BudgetPolicy:
    """At most ``max_experts`` distinct experts per batch, chosen by total gate weight."""

    name = "budget"
    max_experts: Optional[int] = None

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        if self.max_experts is None:
            raise ConfigError("budget policy needs max_experts (the per-batch expert budget)")
        _check_number("budget max_experts", self.max_experts, 1, router.num_experts, integer=True)


# ----------------------------------------------------------------------------- peer policies
# Published batch-aware rules, served for comparison; the rules live in ``peers.py`` (torch backend only).


def lynx_paper_depth(beta: Optional[int], max_tokens: int) -> Optional[int]:
    """Deepest level D whose votes the exact popularity score of ``lynx_paper`` counts.

    The score sums ``B**(D - level)`` over rows (levels 0..D), below ``B**(D + 1)``; it
    must stay below 2**62. With ``beta`` set, D = beta (None if that overflows at
    ``max_tokens``); without, D is the deepest level that fits.
    """
    bits = max(1, math.ceil(math.log2(max(2, max_tokens))))
    if beta is not None:
        return beta if (beta + 1) * bits <= _INT64_BITS else None
    return _INT64_BITS // bits - 1


@dataclass(frozen=True)
class LynxPaperPolicy:
    """The official Lynx rule (gt-nexs/lynx, ``src/lynx/routing.py``); see ``peers.lynx_paper_select``.

    alpha: quantisation steps per logit: ``q = ceil(alpha * (z - max z))``.
    beta: ``q`` is clamped at ``-beta`` (None: no clamp, as their ``quant`` and
        ``quant_alphaX_optimized`` policies).
    Their per-model settings are the presets ``LYNX_PAPER_PRESETS``.
    """

    name = "lynx_paper"
    alpha: float = 1.0
    beta: Optional[int] = None

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        _check_number("lynx_paper alpha", self.alpha, 1e-3, 1e3, integer=False)
        if self.beta is not None:
            _check_number("lynx_paper beta", self.beta, 0, MAX_BETA, integer=True)
            if lynx_paper_depth(self.beta, max_tokens) is None:
                raise ConfigError(
                    f"lynx_paper beta={self.beta} with up to {max_tokens} tokens per batch overflows the "
                    f"exact integer popularity score; lower beta or the maximum batch size"
                )


@dataclass(frozen=True)
class XSharePolicy:
    """XShare's batch expert budget (vLLM PR 35551, ``MoEPruningConfig``); see ``peers.xshare_select``.

    expert_budget: experts kept for the batch (None: ``budget_alpha * E``; 0 is refused: a
        budget of no expert is not a budget, use ``budget_alpha`` 0 for "no batch set").
    budget_alpha: fraction of E kept when ``expert_budget`` is None (0: no batch set).
    top_per_token: every token also keeps its own top this many (0: none).
    min_batch / max_batch: the rule runs only on batches of ``min_batch <= B`` (and
        ``B <= max_batch`` when ``max_batch > 0``) voting rows; other batches pass through.
    guarantee_topk: as vLLM's gpt-oss path (which passes ``topk``): when the budget is below
        ``top_k`` every token keeps its whole top-k, which makes the rule a no-op.
    """

    name = "xshare"
    expert_budget: Optional[int] = None
    budget_alpha: float = 0.5
    top_per_token: int = 0
    min_batch: int = 0
    max_batch: int = 0
    guarantee_topk: bool = True

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        E = router.num_experts
        if self.expert_budget is not None:
            _check_number("xshare expert_budget", self.expert_budget, 1, E, integer=True)
        _check_number("xshare budget_alpha", self.budget_alpha, 0.0, 1.0, integer=False)
        _check_number("xshare top_per_token", self.top_per_token, 0, E, integer=True)
        _check_number("xshare min_batch", self.min_batch, 0, 1 << 30, integer=True)
        _check_number("xshare max_batch", self.max_batch, 0, 1 << 30, integer=True)
        if not isinstance(self.guarantee_topk, bool):
            raise ConfigError(f"xshare guarantee_topk must be a bool, got {self.guarantee_topk!r}")

    def budget(self, router: RouterSpec) -> int:
        """Experts of the batch set (their ``ml``): 0 means no batch set."""
        E = router.num_experts
        if self.expert_budget:
            return min(self.expert_budget, E)
        return max(1, int(self.budget_alpha * E)) if self.budget_alpha > 0 else 0


@dataclass(frozen=True)
class SerePolicy:
    """SERE's similarity re-routing (JL-Cheng/SERE, ``vllm/SERE_vllm``); see ``peers.sere_select``.

    select_top_k: S, the picks per token that are primary (1..top_k; top_k: no-op).
    threshold: rho in [-1, 1] (similarities lie in [-1, 1]); a secondary pick whose best
        primary has similarity below rho stays (rho <= 0: every secondary pick outside the
        primary set is re-routed, their default 0).
    The [E, E] similarity matrix is a plan-time input (``ExpertSelector(similarity=...)``, the
    server loads it with ``similarity.load_similarity``).
    """

    name = "sere"
    select_top_k: int = 1
    threshold: float = 0.0

    def validate(self, router: RouterSpec, max_tokens: int) -> None:
        _check_number("sere select_top_k", self.select_top_k, 1, router.top_k, integer=True)
        _check_number("sere threshold (rho: similarities lie in [-1, 1])", self.threshold, -1.0, 1.0,
                      integer=False)


PeerPolicy = Union[LynxPaperPolicy, XSharePolicy, SerePolicy]
PEER_POLICIES = {cls.name: cls for cls in (LynxPaperPolicy, XSharePolicy, SerePolicy)}
# The policy types the torch backend runs through ``peers.select_peer`` (no Triton kernels).
PEER_POLICY_TYPES = tuple(PEER_POLICIES.values())

# The official Lynx per-model settings (gt-nexs/lynx ``src/lynx/registry.py``, LYNX_MODEL_REGISTRY, and the
# config files it names, ``src/lynx/configs/<family>/<file>.json``), as presets of ``lynx_paper``.
# Where the policy name (``quant_alpha{a}_beta{b}_optimized``) selects a kernel with alpha/beta baked in,
# the name decides (their softmax path ignores the file's alpha/beta fields); their grouped path
# (DeepSeek) reads the file's ``alpha``/``beta`` fields, their sigmoid path (Llama 4, policy ``quant``)
# reads ``alpha`` and has no beta. docs/policies.md lists the source of each.
LYNX_PAPER_PRESETS = {
    "qwen3-235b-thinking": {"alpha": 1.0, "beta": 2},  # qwen3_235b/quant_alpha1_beta2_optimized.json
    "qwen3-235b": {"alpha": 3.0, "beta": 2},  # qwen3_235b/quant_alpha3_beta2_optimized.json
    # Their registry names qwen3_30b/quant_alpha3_beta2_optimized.json, which their repository does not
    # contain (only do_nothing / quant_alpha1_beta1_optimized); alpha 3, beta 2 is the intended setting.
    "qwen3-30b-a3b": {"alpha": 3.0, "beta": 2},
    "qwen2-57b": {"alpha": 3.0, "beta": 4},  # qwen2/quant_alpha3_beta4_optimized.json
    "mixtral-8x22b": {"alpha": 1.0, "beta": 1},  # mixtral/quant_alpha1_beta1_optimized.json
    "mixtral-8x7b": {"alpha": 0.7, "beta": 1},  # mixtral/quant_alpha0.7_beta1_optimized.json
    # deepseek_v2_coder/quant_alpha1_beta1_optimized.json: the grouped path reads the file's alpha 1, beta 2.
    "deepseek-coder-v2": {"alpha": 1.0, "beta": 2},
    "gpt-oss-120b": {"alpha": 3.0, "beta": 2},  # gpt_oss_120b/quant_alpha3_beta2_optimized.json
    "llama-4": {"alpha": 1.0, "beta": None},  # llama4/quant_alpha1.json (policy quant: no beta)
}


Policy = Union[OffPolicy, LynxPolicy, RankAwareLynxPolicy, OeaPolicy, BudgetPolicy, LynxPaperPolicy, XSharePolicy,
               SerePolicy]
POLICIES = {cls.name: cls for cls in (OffPolicy, LynxPolicy, RankAwareLynxPolicy, OeaPolicy, BudgetPolicy,
                                      *PEER_POLICY_TYPES)}
# Stable small integers for the kernels (lynx_ep and the peer policies have none: torch backend only).
POLICY_IDS = {"off": 0, "lynx": 1, "oea": 2, "budget": 3}


# lynx's refill_similarity when a similarity file sits beside the model (either backend: stage.with_default_refill)
# (docs/policies.md: at or near the best lambda on every bundled model; units of the router's ranking score).
DEFAULT_REFILL_SIMILARITY = 8.0


def router_family(router: RouterSpec) -> str:
    """The router in words, for start-up logs: scoring, bias, shape."""
    scoring = "sigmoid scores" if router.scoring_func == "sigmoid" else "softmax"
    bias = " ranked with a correction bias" if router.has_correction_bias else ""
    shared = f" + {router.num_shared_slots} shared slot(s)" if router.num_shared_slots else ""
    return f"{scoring}{bias}, E={router.num_experts}, top-{router.top_k}{shared}"


def needs_similarity(policy) -> bool:
    """Whether ``policy`` reads the layers' expert-similarity file (sere; lynx with refill_similarity > 0)."""
    return isinstance(policy, SerePolicy) or (isinstance(policy, LynxPolicy) and policy.refill_similarity > 0)


def is_peer(policy) -> bool:
    """Whether ``policy`` is one of the peer rules (``peers.select_peer``; torch backend only)."""
    return isinstance(policy, PEER_POLICY_TYPES)


def preset_params(name: str) -> dict:
    """The ``lynx_paper`` parameters of an official Lynx preset (ConfigError for an unknown name)."""
    if name not in LYNX_PAPER_PRESETS:
        raise ConfigError(f"unknown --lynx-preset {name!r} (choose from {', '.join(LYNX_PAPER_PRESETS)})")
    return dict(LYNX_PAPER_PRESETS[name])


def make_policy(name: str, **params) -> Policy:
    """Build a policy by name; unknown names or parameters raise ConfigError."""
    if name not in POLICIES:
        raise ConfigError(f"unknown expert-selection policy {name!r} (choose from {', '.join(POLICIES)})")
    cls = POLICIES[name]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"policy {name!r} has no parameter(s) {', '.join(unknown)}"
            + (f" (it takes: {', '.join(sorted(known))})" if known else " (it takes none)")
        )
    return cls(**params)


def policy_params(policy: Policy) -> dict:
    """The policy's parameters as a plain dict (for logs and result files)."""
    return {"name": policy.name, **asdict(policy)}
