"""Lynx's server options: the flags we add to ``sglang.launch_server`` and how they reach every worker.

The launcher parses them with SGLang's own parser (we add an argument group);
``ServerArgs.from_cli_args`` drops fields it does not know, so we carry ours in
the environment variable ``LYNX_SGLANG_OPTIONS`` (JSON), which the scheduler,
TP/EP workers and any process they spawn inherit. Users of the Python
``sglang.Engine`` API, which has no CLI, set that variable themselves
(``LynxOptions(...).to_env()``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from lynx_sglang.runtime.selection.config import (
    LYNX_PAPER_PRESETS, MAX_EXPERTS, MAX_ROUTED_TOP_K, POLICIES, RESIDENCY_MODES, ConfigError, RouterSpec,
    make_policy, needs_similarity, preset_params,
)
from lynx_sglang.runtime.selection.similarity import DEFAULT_NAME as SIMILARITY_FILE

ENV_VAR = "LYNX_SGLANG_OPTIONS"
# Set to a directory: every TP rank dumps its per-layer statistics there (metrics.dump_stats).
STATS_DIR_ENV = "LYNX_SGLANG_STATS_DIR"
MOE_BACKENDS = ("default", "lynx")
# Our choice added to SGLang's --moe-a2a-backend; SGLang itself then runs as with "none".
A2A_BACKEND = "lynx"
# A per-layer calibration file (python -m lynx_sglang.calibrate), accepted by --lynx-config. Format 2 writes
# every policy parameter into base_params, so a later change of a default cannot change what a file means.
CALIBRATION_FORMAT = "lynx-calibration/2"
# Format 1 files relied on the defaults of their time: lynx's keep_level was 1 then (0 since session 10).
_FORMAT_1_DEFAULTS = {"lynx": {"keep_level": 1}}
# Flags a calibration file fixes: with one given, the file and the flag would both claim the policy.
_CALIBRATION_FIXES = ("lynx_policy", "lynx_preset", "lynx_layers", "lynx_sere_similarity")


def _bool(text: str) -> bool:
    """A true/false flag value (argparse's ``type=bool`` would take any non-empty string as True)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _residency(text: str) -> str:
    """A ``--lynx-residency`` value (the Engine API and config files are checked by ``LynxPolicy.validate``)."""
    if text not in RESIDENCY_MODES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(RESIDENCY_MODES)}, got {text!r}")
    return text


# Flag name -> (policy parameter, type). One flag per parameter keeps `--help` self-explanatory.
# --lynx-alpha / --lynx-beta also set lynx_paper's alpha / beta (the same names there).
_POLICY_FLAGS = {
    "lynx_alpha": ("alpha", float),
    "lynx_beta": ("beta", int),
    "lynx_keep_level": ("keep_level", int),
    "lynx_min_votes": ("min_votes", int),
    "lynx_min_keep": ("min_keep", int),
    "lynx_confidence_margin": ("confidence_margin", float),
    "lynx_max_moved_weight": ("max_moved_weight", float),
    "lynx_keep_top": ("keep_top", int),
    "lynx_rank_slack": ("rank_slack", float),
    "lynx_oea_k0": ("k0", int),
    "lynx_budget_experts": ("max_experts", int),
    "lynx_xshare_budget": ("expert_budget", int),
    "lynx_xshare_budget_alpha": ("budget_alpha", float),
    "lynx_xshare_top_per_token": ("top_per_token", int),
    "lynx_xshare_min_batch": ("min_batch", int),
    "lynx_xshare_max_batch": ("max_batch", int),
    "lynx_xshare_guarantee_topk": ("guarantee_topk", _bool),
    "lynx_sere_top_s": ("select_top_k", int),
    "lynx_sere_threshold": ("threshold", float),
    "lynx_refill_similarity": ("refill_similarity", float),
    "lynx_residency": ("residency", _residency),
    "lynx_residency_max_moved_weight": ("residency_max_moved_weight", float),
    "lynx_residency_page_budget": ("residency_page_budget", int),
}
# Help beyond "policy parameter X" where the parameter's name does not say it.
_FLAG_HELP = {
    "lynx_keep_top": "lynx: every token keeps its N best picks whatever the moved-weight cap lets move (default: "
                     "a quarter of the routed top-k, 2 at top-8; 0: none); docs/policies.md",
    "lynx_residency": "lynx on SGLang's paged experts (--enable-paged-experts): off (default), keep (lynx + every "
                      "resident pick stays) or prefer (resident-first: keep resident picks and the picks rows cannot "
                      "move); reads each paged layer's device residency, needs CUDA graphs not fully disabled; "
                      "layers that are not paged run plain lynx. docs/offload.md",
    "lynx_residency_max_moved_weight": "with --lynx-residency keep/prefer: the moved-weight cap on paged layers "
                                       "(default: --lynx-max-moved-weight; at K = E/4, B = 16: 0.55 pages 2.07x "
                                       "fewer experts than off on the bundled qwen3; docs/offload.md)",
    "lynx_residency_page_budget": "with --lynx-residency prefer: at most N experts paged per paged layer and step "
                                  "beyond the tokens' best picks (default: no budget); bounds a step's PCIe time. "
                                  "docs/offload.md",
}
_PARAMS_OF = {name: {f.name for f in fields(cls)} for name, cls in POLICIES.items()}


@dataclass
class LynxOptions:
    """Everything the plugin needs in a worker process."""

    moe_backend: str = "default"
    policy: str = "lynx"
    params: dict = field(default_factory=dict)
    layers: Optional[list[int]] = None  # None: every MoE layer
    max_batch: int = 1024  # largest decode batch a selector is planned for
    # Smallest decode batch (tokens) selected on; smaller ones pass through. On a GPU the stage costs about
    # 18 us per layer whatever the batch, and below about 3 tokens lynx removes too few experts to repay it
    # (docs/gpu.md, an estimate). 0: every batch (one token is skipped anyway under plain lynx).
    min_batch: int = 0
    torch_compile: bool = False  # run the torch backend's step through torch.compile (CPU serving)
    a2a_backend: str = "none"  # "lynx": our all-to-all dispatcher (--moe-a2a-backend lynx)
    preset: Optional[str] = None  # an official Lynx preset of lynx_paper (params override it)
    similarity: Optional[str] = None  # sere: the similarity file (None: <model path>/sere_similarity.safetensors)
    # --lynx-residency-output-norms: the output-norm heads file (selection.output_norms) that paged layers' page
    # budgets rank by; None: they rank by routed weight.
    output_norms: Optional[str] = None
    # A calibration file's per-layer plan: {layer_id: {param: value} (over ``params``) or None (no selection
    # on that layer)}; None: every layer runs ``params``. Keys are SGLang's decoder ``layer_id``.
    layer_params: Optional[dict] = None
    # Where that plan came from and what model it was made for (checked against the served model at load):
    # file, identity (model_identity), num_experts, top_k, scoring, budget_kl.
    calibration: Optional[dict] = None

    def __post_init__(self):
        if self.layer_params is not None:  # JSON (the environment) turns int keys into strings
            if not isinstance(self.layer_params, dict):
                raise ConfigError(f"layer_params must map layer ids to parameters, got {self.layer_params!r}")
            plan = {}
            for key, value in self.layer_params.items():
                try:
                    layer = int(key)
                except (TypeError, ValueError):
                    raise ConfigError(f"layer_params: {key!r} is not a layer id") from None
                if value is not None and not isinstance(value, dict):
                    raise ConfigError(f"layer_params[{layer}] must be a dict of parameters or null, got {value!r}")
                plan[layer] = None if value is None else dict(value)
            self.layer_params = plan

    @property
    def enabled(self) -> bool:
        """True when ``--moe-backend lynx`` is in effect."""
        return self.moe_backend == "lynx"

    @property
    def uses_similarity(self) -> bool:
        """Whether the policy reads the expert-similarity file (sere; lynx with refill_similarity > 0)."""
        return needs_similarity(self.make_policy())

    def make_policy(self, layer_id: Optional[int] = None):
        """The configured policy object (raises ConfigError on bad names or parameters); a preset's
        parameters first, ``params`` over them, then ``layer_id``'s entry of ``layer_params`` (if any)."""
        base = preset_params(self.preset) if self.preset is not None else {}
        own = (self.layer_params or {}).get(layer_id) if layer_id is not None else None
        return make_policy(self.policy, **{**base, **self.params, **(own or {})})

    def layer_enabled(self, layer_id: Optional[int]) -> bool:
        """Whether selection runs on this MoE layer (a calibration plan's null entry: no)."""
        if self.layer_params is not None and layer_id in self.layer_params and self.layer_params[layer_id] is None:
            return False
        return self.layers is None or layer_id in self.layers

    def validate(self) -> None:
        """Checks that need no model: names, parameter ranges, batch bound."""
        if self.moe_backend not in MOE_BACKENDS:
            raise ConfigError(f"--moe-backend must be one of {MOE_BACKENDS}, got {self.moe_backend!r}")
        if self.a2a_backend not in ("none", A2A_BACKEND):
            raise ConfigError(f"a2a_backend must be 'none' or {A2A_BACKEND!r}, got {self.a2a_backend!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"--lynx-max-batch must be a positive int, got {self.max_batch!r}")
        if not isinstance(self.min_batch, int) or not 0 <= self.min_batch <= self.max_batch:
            raise ConfigError(f"--lynx-min-batch must be an int from 0 to --lynx-max-batch ({self.max_batch}), "
                              f"got {self.min_batch!r}")
        if not isinstance(self.torch_compile, bool):
            raise ConfigError(f"torch_compile must be true or false, got {self.torch_compile!r}")
        if self.layers is not None and any((not isinstance(i, int)) or i < 0 for i in self.layers):
            raise ConfigError(f"--lynx-layers must list non-negative layer ids, got {self.layers!r}")
        if self.preset is not None and self.policy != "lynx_paper":
            raise ConfigError(f"--lynx-preset {self.preset} is a setting of --lynx-policy lynx_paper (the official "
                              f"Lynx rule), not of {self.policy}")
        if self.similarity is not None and not self.uses_similarity:
            raise ConfigError(f"--lynx-sere-similarity does not apply to --lynx-policy {self.policy} (only to sere, "
                              f"and to lynx with --lynx-refill-similarity)")
        policy = self.make_policy()
        if self.output_norms is not None:
            budgets = [getattr(p, "residency_page_budget", None) for p in
                       [policy] + [self.make_policy(layer) for layer, own in (self.layer_params or {}).items() if own]]
            if getattr(policy, "residency", "off") != "prefer" or all(b is None for b in budgets):
                raise ConfigError("--lynx-residency-output-norms ranks the page budget of paged layers: it needs "
                                  "--lynx-policy lynx with --lynx-residency prefer and --lynx-residency-page-budget N")
        # Model-dependent bounds (k0 <= k, min_keep <= E, ...) are checked again per layer at load.
        policy.validate(RouterSpec(MAX_EXPERTS, MAX_ROUTED_TOP_K), self.max_batch)
        for layer, own in (self.layer_params or {}).items():
            if own is not None:
                try:
                    self.make_policy(layer).validate(RouterSpec(MAX_EXPERTS, MAX_ROUTED_TOP_K), self.max_batch)
                except ConfigError as e:
                    raise ConfigError(f"layer {layer} of the per-layer plan: {e}") from e

    def to_env(self) -> None:
        """Publish these options to this process and every process it starts."""
        os.environ[ENV_VAR] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "LynxOptions":
        """The options in effect in this process (defaults: stock SGLang)."""
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls()
        try:
            opts = cls(**json.loads(raw))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{ENV_VAR} is not valid lynx-sglang options JSON: {e}") from e
        opts.validate()
        return opts

    @classmethod
    def from_file(cls, path: str) -> "LynxOptions":
        """Options from a JSON file with the same keys as this dataclass."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read --lynx-config {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"--lynx-config {path}: expected a JSON object")
        if "format" in data:
            return cls.from_calibration(data, path)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"--lynx-config {path}: unknown key(s) {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_calibration(cls, data: dict, path: str) -> "LynxOptions":
        """Options from a calibration file (``python -m lynx_sglang.calibrate``): its policy, the parameters
        common to every layer (``base_params``) and each layer's own (``layer_params``); selection on
        (``--moe-backend lynx``). The model it was made for is checked when the model loads (``build_stages``)."""
        legacy = data.get("format") == "lynx-calibration/1"
        if data.get("format") != CALIBRATION_FORMAT and not legacy:
            raise ConfigError(f"--lynx-config {path}: unknown format {data.get('format')!r} "
                              f"(this version reads {CALIBRATION_FORMAT!r} and 'lynx-calibration/1')")
        missing = [k for k in ("policy", "layer_params", "identity", "num_experts", "top_k", "scoring") if k not in data]
        if missing:
            raise ConfigError(f"--lynx-config {path}: calibration file without {', '.join(missing)}")
        if not isinstance(data["layer_params"], dict) or not data["layer_params"]:
            raise ConfigError(f"--lynx-config {path}: the calibration file's layer_params is empty")
        provenance = {"file": os.path.abspath(path), "identity": data["identity"], "num_experts": data["num_experts"],
                      "top_k": data["top_k"], "scoring": data["scoring"], "budget_kl": data.get("budget_kl")}
        base = dict(data.get("base_params") or {})
        if legacy:  # what the file meant when it was made
            base = {**_FORMAT_1_DEFAULTS.get(data["policy"], {}), **base}
        return cls(moe_backend="lynx", policy=data["policy"], params=base,
                   layer_params=data["layer_params"], calibration=provenance)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--moe-backend`` and the ``--lynx-*`` options to SGLang's parser."""
    g = parser.add_argument_group("lynx-sglang (batch-aware expert selection)")
    g.add_argument("--moe-backend", choices=MOE_BACKENDS, default="default",
                   help="'lynx' rewrites each decode batch's top-k expert choice (lynx-sglang plugin)")
    g.add_argument("--lynx-policy", choices=sorted(POLICIES), default=None,
                   help="expert-selection policy (default: lynx); lynx_paper, xshare and sere are the published "
                        "peer rules; see docs/policies.md")
    g.add_argument("--lynx-preset", choices=list(LYNX_PAPER_PRESETS), default=None,
                   help="the official Lynx per-model setting (alpha, beta) of --lynx-policy lynx_paper (implied); "
                        "--lynx-alpha / --lynx-beta override it")
    for flag, (param, typ) in _POLICY_FLAGS.items():
        g.add_argument("--" + flag.replace("_", "-"), type=typ, default=None,
                       help=_FLAG_HELP.get(flag, f"policy parameter {param}"))
    g.add_argument("--lynx-sere-similarity", type=str, default=None, metavar="PATH",
                   help=f"--lynx-policy sere: the expert-similarity file (python -m lynx_sglang.sere_calibrate; "
                        f"default: <model path>/{SIMILARITY_FILE})")
    g.add_argument("--lynx-residency-output-norms", type=str, default=None, metavar="PATH",
                   help="with --lynx-residency prefer and a page budget: rank every non-resident pick by predicted "
                        "output share (routed weight x predicted expert output norm, a small head per layer from "
                        "python -m lynx_sglang.output_norm_calibrate) instead of routed weight, so a layer pages at "
                        "most N experts per step; helps flat routers (glm4: 20%% less KL at the same page-ins), not "
                        "qwen3's; docs/offload.md")
    g.add_argument("--lynx-layers", type=str, default=None,
                   help="comma-separated MoE layer ids to run selection on (default: all)")
    g.add_argument("--lynx-max-batch", type=int, default=None,
                   help="largest decode batch (tokens) to select on; larger ones pass through (default 1024)")
    g.add_argument("--lynx-min-batch", type=int, default=None,
                   help="smallest decode batch (tokens) to select on; smaller ones pass through (default 0: all). "
                        "On GPUs 4 avoids paying the selection kernels where they cannot repay (docs/gpu.md)")
    g.add_argument("--lynx-torch-compile", action="store_true", default=None,
                   help="run the selection step through torch.compile where it runs on the torch backend (CPU "
                        "servers: about 3x cheaper per layer; compiled at start-up, needs a C++ compiler; "
                        "falls back to eager with a warning where it cannot compile)")
    g.add_argument("--lynx-config", type=str, default=None,
                   help="JSON file with lynx options (keys of LynxOptions; flags override it), or a calibration "
                        "file (python -m lynx_sglang.calibrate: policy and per-layer parameters, refused for another "
                        "model; policy, parameter and layer flags are refused with it)")


def add_a2a_choice(parser: argparse.ArgumentParser) -> None:
    """Offer ``lynx`` among SGLang's ``--moe-a2a-backend`` choices."""
    for action in parser._actions:  # argparse has no public way to extend an option's choices
        if action.dest == "moe_a2a_backend" and action.choices is not None and A2A_BACKEND not in action.choices:
            action.choices = [*action.choices, A2A_BACKEND]
            action.help = (action.help or "") + f" '{A2A_BACKEND}': lynx-sglang's all-to-all dispatcher."


def take_a2a_choice(args: argparse.Namespace) -> str:
    """If ``--moe-a2a-backend lynx`` was given, check the parallel layout and hand SGLang ``none``.

    Our dispatcher lives inside SGLang's a2a-``none`` data path (TP attention,
    experts sharded, partial outputs all-reduced), so SGLang must see ``none``.
    Returns the a2a backend for ``LynxOptions``.
    """
    if getattr(args, "moe_a2a_backend", None) != A2A_BACKEND:
        return "none"
    tp, ep = getattr(args, "tp_size", 1) or 1, getattr(args, "ep_size", 1) or 1
    if ep < 2 or ep != tp:
        raise ConfigError(f"--moe-a2a-backend {A2A_BACKEND} needs --ep-size equal to --tp-size and >= 2 "
                          f"(got --tp-size {tp}, --ep-size {ep})")
    flags, sizes = ("enable_dp_attention", "enable_two_batch_overlap"), ("attn_dp_size", "attn_cp_size")
    missing = [f for f in flags + sizes if not hasattr(args, f)]
    if missing:  # an SGLang rename: refuse rather than admit what we cannot check
        raise ConfigError(f"--moe-a2a-backend {A2A_BACKEND}: SGLang's parsed arguments have no {missing[0]!r}; "
                          f"cannot check that the configuration is supported")
    on = [f for f in flags if getattr(args, f)]
    on += [f for f in sizes if (getattr(args, f) or 1) > 1]
    if on:
        raise ConfigError(f"--moe-a2a-backend {A2A_BACKEND} does not support --{on[0].replace('_', '-')} "
                          f"(it assumes every rank holds the same rows and one batch in flight per layer)")
    args.moe_a2a_backend = "none"
    return A2A_BACKEND


def default_similarity_path(model_path) -> Optional[str]:
    """``<model_path>/sere_similarity.safetensors`` when the model is a local folder, else None (a hub id:
    the file must then be named with --lynx-sere-similarity)."""
    if model_path and os.path.isdir(model_path):
        return os.path.join(model_path, SIMILARITY_FILE)
    return None


def options_from_args(args: argparse.Namespace) -> LynxOptions:
    """Combine ``--lynx-config`` and the flags (flags win) and validate."""
    opts = LynxOptions.from_file(args.lynx_config) if getattr(args, "lynx_config", None) else LynxOptions()
    if opts.calibration is not None:
        # A calibration file fixes the policy and every layer's parameters (measured together): a flag that
        # would change them is refused rather than silently merged. --lynx-max/min-batch and the a2a backend apply.
        clash = [f"--{f.replace('_', '-')}" for f in (*_CALIBRATION_FIXES, *_POLICY_FLAGS) if getattr(args, f, None) is not None]
        if clash:
            raise ConfigError(f"--lynx-config {args.lynx_config} is a calibration file: it sets the policy and every "
                              f"layer's parameters, so {', '.join(clash)} cannot be given with it (calibrate again "
                              f"with the setting you want, or drop the flag)")
    if args.moe_backend != "default" or not getattr(args, "lynx_config", None):
        opts.moe_backend = args.moe_backend
    preset = getattr(args, "lynx_preset", None)
    if preset is not None:
        if args.lynx_policy is not None and args.lynx_policy != "lynx_paper":
            raise ConfigError(f"--lynx-preset {preset} is a setting of --lynx-policy lynx_paper (the official Lynx "
                              f"rule); it cannot go with --lynx-policy {args.lynx_policy}")
        preset_params(preset)  # a clear error for an unknown name (the Engine API has no choices check)
    policy = args.lynx_policy if args.lynx_policy is not None else ("lynx_paper" if preset is not None else None)
    if policy is not None:
        if policy != opts.policy:
            opts.params = {}  # parameters of another policy do not carry over
            opts.preset = opts.similarity = None
        opts.policy = policy
    if preset is not None:
        opts.preset = preset
    for flag, (param, _) in _POLICY_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if param not in _PARAMS_OF[opts.policy]:
            raise ConfigError(f"--{flag.replace('_', '-')} does not apply to --lynx-policy {opts.policy}")
        opts.params[param] = value
    if args.lynx_layers is not None:
        try:
            opts.layers = [int(x) for x in args.lynx_layers.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError(f"--lynx-layers must be comma-separated ints, got {args.lynx_layers!r}") from e
    if args.lynx_max_batch is not None:
        opts.max_batch = args.lynx_max_batch
    if getattr(args, "lynx_min_batch", None) is not None:
        opts.min_batch = args.lynx_min_batch
    if getattr(args, "lynx_torch_compile", None):
        opts.torch_compile = True
    similarity = getattr(args, "lynx_sere_similarity", None)
    if similarity is not None:
        if not opts.uses_similarity:
            raise ConfigError(f"--lynx-sere-similarity does not apply to --lynx-policy {opts.policy} (only to sere, "
                              f"and to lynx with --lynx-refill-similarity)")
        opts.similarity = os.path.abspath(similarity)
    if opts.uses_similarity and opts.similarity is None:
        opts.similarity = default_similarity_path(getattr(args, "model_path", None))
    norms = getattr(args, "lynx_residency_output_norms", None)
    if norms is not None:
        opts.output_norms = os.path.abspath(norms)
    given = [f"--{f.replace('_', '-')}" for f in ("lynx_policy", "lynx_preset", *_POLICY_FLAGS, "lynx_sere_similarity",
                                                  "lynx_residency_output_norms",
                                                  "lynx_layers", "lynx_max_batch", "lynx_min_batch",
                                                  "lynx_torch_compile")
             if getattr(args, f, None) is not None]
    if given and not opts.enabled:
        raise ConfigError(f"{', '.join(given)} only take effect with --moe-backend lynx (without it the server "
                          f"is stock SGLang)")
    opts.a2a_backend = take_a2a_choice(args)
    opts.validate()
    return opts
