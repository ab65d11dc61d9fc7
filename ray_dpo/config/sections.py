"""The sections of a run config: one dataclass per top-level YAML section, every field
documented where it is declared.

A field whose value names a registered thing (a layout, a data format or policy, a
generation backend, a pair strategy, a weight-sync method) is
``Annotated[str, OneOf(registry)]``: the config accepts whatever that registry holds, looked
up when a config is built, so registering a new entry needs no change here. loss.type is checked against the loss
registry the same way (ray_dpo.config.checks).

Pure: imports neither torch, ray, deepspeed nor vllm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

from ray_dpo.config.names import OneOf
from ray_dpo.config.paths import join_path


@dataclass
class RunSection:
    name: str = "ray-dpo"
    """Run name. Running the same name with the same storage_path again resumes it."""
    storage_path: str = "./ray_dpo_runs"
    """Where checkpoints, the reference cache and the default MLflow store live.
    Must be shared storage (NFS, s3://, gs://) on a multi-node cluster."""
    seed: int = 0
    """Seed for data shuffling and model initialisation noise."""
    capacity_wait_s: float = 600.0
    """How long a run waits for a lost node's capacity to come back (a replacement node that
    can hold the policy workers, a reference actor or an engine) before it fails with the
    command that resumes it. The wait is said on the console when it begins; 0 fails at once."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks cuda+nccl when the cluster has GPUs, else cpu+gloo."""
    local_num_cpus: Optional[int] = None
    """Logical CPUs for a local Ray cluster started by ray-dpo (ignored when RAY_ADDRESS
    is set). Default: max(4, cores, what the config's actors hold at once + 1), so data
    tasks and actors never starve behind train workers (local_cpus_needed below)."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face model directory (or hub id on clusters that may download)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to name_or_path."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Weights' dtype of every model of the run (policy, reference, engines, judges). bf16 is
    mixed precision (DeepSpeed's bf16 mode): bf16 weights, activations and gradients; fp32
    master weights and Adam state in the optimizer; gradients summed over micro-batches in
    fp32 under ZeRO 1-3 (bf16 without ZeRO: refused where a step accumulates). Log-probs and
    the loss are fp32 in every dtype. docs/architecture.md, "Precision"."""
    chat_template: Optional[str] = None
    """Chat template replacing the tokenizer's own: the path of a Jinja file, or the template
    itself inline (any value containing "{%" or "{{", e.g. a YAML block scalar or
    --set "model.chat_template={% for m in messages %}..."). Used to build the pairs, to
    sample online / held-out prompts, and written into the exported hf_model/ tokenizer
    (chat_template.jinja and tokenizer_config.json), so the model serves with the template
    it was trained with."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    """Passed to from_pretrained, e.g. "sdpa" or "flash_attention_2" (GPU only)."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """JSONL / Parquet shards: files, directories or globs; local or s3:// / gs://."""
    eval_files: list[str] = field(default_factory=list)
    """Optional held-out preference pairs, same formats."""
    format: Annotated[str, OneOf("ray_dpo.data.formats:FORMATS")] = "auto"
    """Row format; auto detects it per row. unpaired (TRL: prompt, completion, label) and
    sharegpt_kto (LLaMA-Factory: messages + kto_tag) are labelled examples for loss.type=kto;
    prompt_only (prompt or messages alone) are prompts for online.pair_strategy=best_vs_worst."""
    unpair: bool = False
    """Unpaired losses (kto) only: each preference pair becomes two examples, chosen
    desirable and rejected undesirable (counted as two rows in the data report)."""
    max_length: int = 1024
    """Maximum tokens of prompt + one response."""
    max_prompt_length: int = 512
    """Maximum prompt tokens."""
    over_length: Annotated[str, OneOf("ray_dpo.data.tokenize:OVER_LENGTH_POLICIES")] = "truncate_prompt"
    """A pair over the limits is counted (per cause, in the data report) and:
    truncate_prompt shortens the prompt, then cuts responses from the right. Chat prompts
    lose whole earliest turns first (a leading system message stays, the kept part starts
    at a user turn, every message keeps its role header); only when the last user turn
    alone is too long is that message cut inside its content, keeping its end; a pair whose
    system prompt + headers cannot fit is dropped. Text prompts keep their last
    max_prompt_length tokens (a BOS the tokenizer adds stays in front).
    truncate_response never cuts the prompt (a prompt over max_prompt_length drops the
    pair) and cuts responses to fit; drop drops the pair."""
    on_bad_row: Annotated[str, OneOf("ray_dpo.data.tokenize:BAD_ROW_POLICIES")] = "error"
    """error: stop at the first malformed row, naming file and line; skip: count it."""
    shuffle: bool = True
    """Shuffle pairs each epoch (seeded by run.seed and the epoch)."""


@dataclass
class LossConfig:
    type: str = "sigmoid"
    """Loss registered in ray_dpo.losses.LOSSES: sigmoid, robust, hinge, ipo (pairs + reference), simpo, orpo
    (pairs, no reference: none is started) or kto (unpaired examples + reference); the
    README's loss table lists what each needs and reads."""
    beta: float = 0.1
    """Strength of the KL constraint to the reference (> 0); SimPO: reward scale of the mean
    token log-prob (the paper uses 2-10); ORPO: the weight λ of the odds-ratio term (as TRL)."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate for cDPO (sigmoid), robust DPO and SimPO, in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of an extra NLL term on the chosen response (0 disables; ORPO has its own)."""
    length_normalize: bool = False
    """DPO family: divide sequence log-probs by response length before forming the logits."""
    gamma: Optional[float] = None
    """SimPO only: target reward margin γ, absolute (the paper's γ/β ratio times beta);
    unset: 0.5, TRL's simpo_gamma."""
    desirable_weight: Optional[float] = None
    """KTO only: λ_D, weight of desirable examples (unset: 1.0)."""
    undesirable_weight: Optional[float] = None
    """KTO only: λ_U, weight of undesirable examples (unset: 1.0). The KTO paper advises
    λ_D n_D / (λ_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples."""


@dataclass
class ReferenceConfig:
    model: Optional[str] = None
    """Reference model directory; default: the policy's initial weights (model.name_or_path)."""
    num_actors: int = 1
    """Long-lived actors that each hold a frozen copy of the reference model."""
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per actor, e.g. {reference_node: 0.01} to pin them to nodes."""
    batch_size: int = 8
    """Pairs per log-prob call."""
    max_in_flight: int = 2
    """Batches queued per actor; bounds memory while keeping actors busy."""
    precompute: bool = False
    """Score the whole data set once before training and cache it on storage."""
    cache_dir: Optional[str] = None
    """Where precomputed log-probs go; default: <storage_path>/reference_cache."""
    max_restarts: int = 3
    """How often a dead reference actor is restarted before the run fails."""
    layout: Annotated[str, OneOf("ray_dpo.batching.layouts:LAYOUTS")] = "padded"
    """Batch layout of the reference forward (see policy.layout): same log-probs, fewer
    computed positions. prefix_shared needs model.attn_implementation sdpa or eager."""
    max_tokens_per_row: Optional[int] = None
    """packed / prefix_shared: row capacity in tokens (None: one row per forward, no padding).
    sdpa/eager compute dense rows x T x T attention, so keep rows to a few thousand tokens."""


@dataclass
class LoraSection:
    """LoRA (low-rank adapters, through peft): train small adapter matrices beside frozen
    base weights instead of every parameter. Off unless rank > 0."""

    rank: int = 0
    """Adapter rank r; 0 (default) trains every parameter (no LoRA)."""
    alpha: float = 16.0
    """Scaling numerator: the adapter's update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only). The base model's dropout stays off
    whatever this says, so the step-0 loss is still ln 2."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Which linear layers get adapters: module names matched as peft does (a name matches
    a module whose path ends with it, e.g. q_proj), or all-linear: every linear layer but
    the output head. A name that matches no linear layer of the model is a config error
    that lists the model's linear layer names."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (e.g. lm_head)."""
    reference: Literal["adapters_off", "group"] = "adapters_off"
    """Where the base model's (the reference's) log-probs come from:
    adapters_off: the policy worker runs its own model with the adapters switched off
        (one extra no-grad forward per micro-batch, no reference actor, no second copy of
        the weights: the default, since LoRA is what people use when memory is short);
    group: the reference actor group serves the base model, streamed or precomputed
        (reference.precompute); the cache key is the base model + data + tokenizer, so
        every LoRA run on that base and data (a beta or rank sweep, a rerun) reuses one
        reference pass."""
    sync: Literal["adapter", "merged"] = "adapter"
    """What online rounds and held-out sampling send to the generation engines at a sync:
    adapter: the adapter alone (a few MB), loaded through the engine's LoRA support on top
        of the base model it started with (vLLM: a new adapter version per sync);
    merged: the whole model with the adapter merged in, as a full-parameter run sends it:
        for engines or architectures without LoRA support (the weights are merged into a
        copy; training's are untouched)."""
    merge_on_export: bool = False
    """At the end, also write hf_model/: the base model with the adapters merged in, a plain
    transformers model (the adapter alone is always written, to adapter/)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class PolicyConfig:
    num_workers: int = 1
    """Ray Train workers, each one DeepSpeed engine (one per GPU on a GPU cluster)."""
    min_workers: Optional[int] = None
    """Elastic data parallelism: when workers are lost with their node and no node has room
    for them, train on as few as this many instead of waiting (run.capacity_wait_s), and
    grow back to num_workers when nodes return (checked every policy.resize_check_s). Every
    step keeps its pairs and its update: fewer workers accumulate more micro-batches. Each
    resize restarts the group from the latest checkpoint. None: always num_workers."""
    resize_check_s: float = 60.0
    """Elastic runs (policy.min_workers): how often a smaller group checks whether nodes
    came back to grow to num_workers."""
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 1.0
    """Used only when the run uses GPUs."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per worker, e.g. {policy_node: 0.01}."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    micro_batch_size: int = 4
    """Pairs per worker per forward/backward."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    num_epochs: int = 1
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (default: num_epochs over the data)."""
    checkpoint_every_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    num_checkpoints_to_keep: int = 2
    """Checkpoints kept on storage (>= 1); older ones are deleted as new ones are written.
    Keep 2 or more: resume falls back to the previous checkpoint when the latest is incomplete."""
    max_failures: int = 3
    """Times the policy worker group is restarted from the latest checkpoint inside the same
    run when a worker dies (process killed, node lost, an error in the training loop); the
    BatchFeeder actor is restarted up to this many times too. 0: the first failure ends the
    run (run the same command again to resume). Node preemptions Ray sees coming (drains)
    are not counted."""
    sigterm_grace_s: float = 0.0
    """A policy worker sent SIGTERM (what Kubernetes sends before evicting a pod, SIGKILL
    following after terminationGracePeriodSeconds, 30 s by default) finishes its step, the
    group saves a checkpoint, then it exits, if that takes at most this many seconds; the
    restarted group then loses no step. 0: SIGTERM kills at once (back to the last
    checkpoint). Keep it below the pod's grace period minus a checkpoint's write time.
    Off by default: not yet measured, and surviving ranks of a group Ray Train stops after a
    failure would also wait it out before exiting."""
    save_hf_model: bool = True
    """Save the final policy in Hugging Face format (loadable by from_pretrained / vLLM) under
    the last checkpoint's hf_model/; a LoRA run saves its peft adapter under adapter/ instead
    (and hf_model/, merged, with policy.lora.merge_on_export)."""
    offload_optimizer: bool = False
    """ZeRO optimizer-state offload to CPU (GPU runs)."""
    layout: Annotated[str, OneOf("ray_dpo.batching.layouts:LAYOUTS")] = "padded"
    """How a micro-batch's chosen+rejected sequences become model rows (ray_dpo.batching.layouts):
    padded: prompt+chosen and prompt+rejected rows, right-padded (the classic layout).
    packed: the same sequences concatenated into rows without padding, position ids
        restarting per sequence, attention kept inside each sequence (flash varlen on GPU,
        a 4D mask with sdpa/eager).
    prefix_shared: prompt, chosen, rejected in one sequence; rejected sees the prompt but
        not chosen, so the prompt is computed once per pair instead of twice. Needs
        model.attn_implementation "sdpa" or "eager" (a 4D mask; flash attention takes none).
    All three give the same log-probs (to float rounding). Only models whose positions come
    from position_ids (RoPE, learned absolute) can use packed / prefix_shared; a custom mask
    also bypasses sliding-window attention (see docs/architecture.md, "Batch layouts")."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Token budget per forward (packed / prefix_shared: its tokens, so with one row per
    forward it also bounds sdpa/eager's dense T x T attention; padded: rows x T).
    The pairs of each of the gradient_accumulation_steps micro-batches are split into
    consecutive forwards of at most this many computed positions (a longer pair gets a
    forward of its own), and their gradients accumulate before the optimizer step, so the
    update is unchanged. None: one forward per micro-batch."""
    max_tokens_per_row: Optional[int] = None
    """packed / prefix_shared: row capacity in tokens (first-fit decreasing; a longer
    sequence gets a row of its own). None: one row per forward, no padding at all: the
    right choice for flash_attention_2 (varlen kernels skip cross-sequence blocks). sdpa /
    eager compute the dense T x T attention of each row, so on long data rows of ~1k tokens
    are faster despite some tail padding (see BENCHMARKS.md)."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapters instead of full-parameter training (policy.lora.rank > 0)."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


@dataclass
class JudgeConfig:
    function: Optional[str] = None
    """Python judge as "package.module:function" taking (prompt, completion) -> float."""
    reward_model: Optional[str] = None
    """Sequence-classification reward model directory, served by its own actors."""
    num_actors: int = 1
    """Reward-model actors (online.judge.reward_model only; a function judge has none)."""
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per reward-model actor, e.g. {judge_node: 0.01} to pin them to nodes."""


@dataclass
class OnlineConfig:
    enabled: bool = False
    """Online (iterative) DPO: the policy's own samples become new pairs each round."""
    rounds: int = 2
    """Rounds in one training run: generate -> judge -> pairs -> train, policy never restarted."""
    prompts_per_round: int = 64
    """Data set prompts sampled per round; a round trains ceil(prompts_per_round / global
    batch) * policy.num_epochs steps (fewer pairs than prompts: the rest are empty steps)."""
    samples_per_prompt: int = 4
    backend: Annotated[str, OneOf("ray_dpo.engines.facts:ENGINES")] = "vllm"
    """Generation engines for online rounds and for eval.prompts_file sampling (offline too)."""
    num_engines: int = 1
    num_cpus_per_engine: float = 1.0
    num_gpus_per_engine: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per generation engine, e.g. {generation_node: 0.01} to pin them to nodes."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pair_strategy: Annotated[str, OneOf("ray_dpo.online.pairs:PAIR_STRATEGIES")] = "regenerate_rejected"
    weight_sync: Annotated[str, OneOf("ray_dpo.engines.facts:SYNC_METHODS")] = "object_store"
    """object_store: one ray.put of the gathered state dict (default, any device);
    checkpoint: a safetensors directory under <storage_path>/<run.name>/weight_sync;
    collective: policy rank 0 broadcasts buckets to the engines over a process group made for
    the sync (gloo on CPU, NCCL on GPUs), no whole-model copy anywhere (docs/architecture.md)."""
    sync_bucket_mb: float = 256.0
    """collective: the most weight data one broadcast carries (a larger tensor goes alone)."""
    sync_timeout_s: float = 1800.0
    """collective: how long the sync waits for its members to arrive (an engine still busy
    with a held-out eval joins when it is done) before it fails. Once all have arrived, forming
    the group and each broadcast may take at most 60 s (or this, if smaller): a member that
    dies then breaks the sync, which is sent again."""
    sync_tolerance: float = 1e-3
    """Largest allowed |log-prob| difference between engine and policy after a sync."""
    overlap: bool = True
    """Generate round r+1 while round r trains (the default): its samples come from the
    policy as it was at round r's start, one round stale (online/sample_staleness_steps).
    false: every round samples the newest policy and training waits for its generation.
    On the sentiment example (3 rounds of 8 steps, 2 CPU cores) overlap took 17% less wall
    time; BENCHMARKS.md has the numbers."""


@dataclass
class MLflowConfig:
    tracking_uri: Optional[str] = None
    """Default: $MLFLOW_TRACKING_URI, else an embedded SQLite store <storage_path>/mlflow.db
    shared by every run of that storage path (so offline and online runs compare)."""
    experiment: str = "ray_dpo"
    run_name: Optional[str] = None
    """Default: run.name."""
    tags: dict[str, str] = field(default_factory=dict)
    log_model_max_mb: float = 50.0
    """The exported model (hf_model/, or a LoRA run's adapter/) is copied into the MLflow run
    as artifacts when its files take at most this many MB; a larger one is linked by its path
    (the ray_dpo.hf_model / ray_dpo.adapter tags) only. 0: always only linked."""


@dataclass
class TrackingConfig:
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    log_every_steps: int = 1
    progress: bool = True
    """Print a progress line (step/total, loss, tokens/s, ETA) on the driver."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.eval_files every N optimizer steps (0: only at the end)."""
    max_pairs: Optional[int] = None
    """Cap on eval pairs (default: all)."""
    prompts_file: Optional[str] = None
    """Held-out prompts (JSONL with "prompt", or one per line) sampled from the policy at
    step 0, every every_steps and at the end; scored by eval.judge (eval/judge_score) and
    KL to the reference (eval/kl). Offline and online runs alike, so they compare. The
    samples are scored while training goes on: no step waits for an eval."""
    num_prompts: int = 32
    samples_per_prompt: int = 4
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """What scores the held-out samples; unset: online.judge (so offline and online runs
    that compare use one judge)."""
    backend: Optional[str] = None
    """Engines that sample the held-out prompts in an offline run (vllm | transformers;
    unset: online.backend). Online runs sample them on their round engines."""
    max_new_tokens: Optional[int] = None
    """Tokens per held-out sample (unset: online.sampling.max_new_tokens). Temperature and
    top_p are always 1: the KL estimate needs samples of the policy itself."""


@dataclass
class SweepConfig:
    """Read by ``ray-dpo sweep`` only (``ray-dpo train`` runs the config as it is, without
    it): the trials, how Ray Tune runs them and which ones it stops early."""

    name: Optional[str] = None
    """The sweep's name: its parent MLflow run, and the prefix of every trial's run.name
    (default: run.name). Running the same sweep again resumes it: finished trials are skipped."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Dotted config key -> the values to try, e.g. {loss.beta: [0.05, 0.1, 0.3]}; every
    combination of the keys' values is a trial (``--grid key=v1,v2`` adds or replaces a key)."""
    sample: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    """Dotted key -> one distribution, drawn num_samples times per grid point with run.seed:
    {uniform: [low, high]}, {loguniform: [low, high]} or {choice: [a, b, ...]}."""
    num_samples: int = 1
    """Draws of the sample keys per grid point (trials = grid points x num_samples)."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0: as many as the cluster's CPUs (GPUs) hold, one on a
    local cluster ray-dpo starts itself (raise run.local_num_cpus for more)."""
    share_reference: bool = True
    """Offline trials whose reference log-probs would be equal (same reference model, data,
    tokenizer) read one cached pass, computed once before the first trial starts
    (reference.precompute is turned on for them). Online trials score their own samples."""
    scheduler: Literal["none", "asha", "median"] = "none"
    """Stop weak trials early on ``metric`` (Ray Tune's ASHA or median stopping rule)."""
    metric: str = "eval/rewards/accuracies"
    """The metric the scheduler compares, as logged in MLflow, e.g. eval/judge_score."""
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1
    """Steps a trial runs before the scheduler may stop it."""
    reduction_factor: float = 2.0
    """ASHA: the fraction 1/reduction_factor of trials goes on at each rung."""
    max_trial_failures: int = 1
    """Times Ray Tune starts a failed trial again (it resumes from its last checkpoint);
    a dead policy worker inside a trial is policy.max_failures' business first."""


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def run_dir(self) -> str:
        """<storage_path>/<run.name>: checkpoints, reports, the default MLflow store."""
        return join_path(self.run.storage_path, self.run.name)

