"""The one typed configuration object, loaded from YAML with ``--set key=value`` overrides.

Example::

    cfg = Config.load("configs/demo.yaml", overrides=["train.epochs=2", "data.batch_size=1024"])
    cfg.train.epochs  # 2
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

if TYPE_CHECKING:
    from dlrm_mtl.schema import Schema


class ConfigError(ValueError):
    """A config that cannot run. ``key``: the config key path it is about (``train.epochs``,
    ``model.task_layers[0].num_experts``; "" when none), used to name the file that set it."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


# key path (dict keys, no list indices) -> the config file that set it; "" = a --set override
Origins = Dict[Tuple[str, ...], str]


EVAL_BATCH_MIN = 4096  # data.eval_batch_size = 0: evaluate in batches of at least this many rows


@dataclass
class DataConfig:
    train: str = "data/synthetic/train"  # file, directory or glob of Parquet files
    eval: str = "data/synthetic/eval"
    schema: str = ""  # default: <dirname of train>/schema.yaml
    batch_size: int = 2048  # per rank
    # rows per rank in each forward of an evaluation (during training and `dlrm-mtl evaluate`)
    # and of `dlrm-mtl predict`; 0 = auto: batch_size, at least EVAL_BATCH_MIN. The metrics are
    # exact sums, the same for any batching; a forward without a backward needs far less memory
    # than a training step, and each batch pays the same per-batch host work (docs/performance.md,
    # "Twentieth round": census PLE's eval set at batch 256 took 0.23 s, at 4096 0.08 s)
    eval_batch_size: int = 0
    shuffle_buffer_rows: int = 65536  # bounded shuffle buffer per rank; 0 = no shuffle
    # batches prepared ahead by a reader thread, and threads reading/decoding row groups ahead
    # (per rank). -1 = auto: 4 and up to 2 where the rank has cores its compute threads leave
    # free, 0 and 0 (read inline, between steps) where they take every core: a reader sharing
    # a core with the step's intra-op threads slows the step more than reading costs
    prefetch_batches: int = -1
    num_workers: int = -1
    # on GPU: the reader thread packs every batch into one page-locked buffer of a reused ring,
    # so that it reaches the device in one asynchronous copy (dlrm_mtl/data/batch_buffers.py).
    # Off by default: on an H100 (batch 8192, demo data) copying each tensor from pageable
    # memory trained at 1.28-1.72M samples/s, while every variant that copied the batch on the
    # reader thread first (pinned per tensor: 0.63-0.73M; packed and pinned: 0.60M; packed,
    # pageable: 0.50M) left the loop waiting for its input (docs/performance.md, "GPU, third
    # round"), although one copy per step makes the step itself 25 % faster (3.69 -> 2.77 ms)
    pin_memory: bool = False
    # the schema's row_id declares ids unique: before training, every id of the train and eval
    # data is checked (the id column only, hash-partitioned over the ranks, bounded memory)
    check_row_ids: bool = True
    # converted row groups (validated, as numpy columns) kept in memory for the next epochs, per
    # stream and rank, in MB: epochs after the first skip decoding, validation and conversion. -1 = auto: a tenth of the
    # memory available at start over the local ranks, at most 4096; 0 = off
    cache_mb: int = -1
    # reader threads' CPU priority: idle (Linux SCHED_IDLE: they run only on cores the training
    # step leaves free, so they never preempt its intra-op threads) | normal
    background_priority: str = "idle"
    # the training epoch's last batch: padded (filled up to batch_size with padding rows, as
    # every rank's last batch in a larger world) | short (its real rows only; a world of one) |
    # auto = short for a world of one on CPU, where no rank waits for it and no static shape
    # is needed (a CUDA-graphed GPU step keeps one), padded elsewhere
    last_batch: str = "auto"

    def eval_rows_per_batch(self) -> int:
        """Rows per rank in each evaluation or prediction forward (``eval_batch_size``, or
        where it is 0 ``batch_size`` and at least :data:`EVAL_BATCH_MIN`)."""
        return self.eval_batch_size if self.eval_batch_size > 0 else max(self.batch_size, EVAL_BATCH_MIN)

    def schema_path(self) -> str:
        """The schema file: ``schema`` if set, else schema.yaml next to or above ``train``."""
        if self.schema:
            return self.schema
        p = Path(self.train)
        base = p if p.is_dir() else p.parent
        for cand in (base / "schema.yaml", base.parent / "schema.yaml"):
            if cand.exists():
                return str(cand)
        raise ConfigError(f"data.schema is not set and no schema.yaml next to or above {self.train}", "data.schema")


@dataclass
class LayerConfig:
    """One scenario or task layer of the expert arch, selected by ``type`` (see
    ``dlrm_mtl/models/arch.py`` for the types and the fields each one reads, ``LAYER_FIELDS``; a
    field a type does not read must keep its default, or the config is refused).

    Example (YAML)::

        scenario_layers: [{type: aesm, level: channel}, {type: aesm, level: domain}]
        task_layers: [{type: ple, levels: 2}]
    """

    type: str = "cgc"
    # scenario layers: the scenario level that routes rows ("each": one layer per level, in
    # schema order; "leaf": the combined id of all levels; "" = the first level)
    level: str = "each"
    num_shared: int = 2  # shared experts (cgc, ple, hinet)
    num_specific: int = 1  # specific experts per scenario value or per task (cgc, ple, hinet)
    num_experts: int = 4  # experts of gate-only designs (omoe, mmoe, ml_mmoe, aesm)
    hidden: List[int] = field(default_factory=list)  # expert MLP hidden sizes ([] = one layer)
    out_dim: int = 64
    levels: int = 1  # stacked extraction levels (ple, ml_mmoe)
    sub_experts: int = 2  # HiNet: sub-experts per SEI module
    gate: str = "softmax"  # softmax | noisy | topk (gate-only designs)
    top_k: int = 0  # experts kept per row by a top-K gate
    noise: float = 1.0  # gate noise scale in training (noisy gate, AESM²)
    k_specific: int = 1  # AESM²: specific experts selected per row
    k_shared: int = 1  # AESM²: shared experts selected per row
    aux_weight: float = 0.0  # weight of the layer's auxiliary losses (AESM² KL, sluice orthogonality), 0 = off
    norm: bool = True  # STAR: partitioned normalisation
    task_emb_dim: int = 8  # AESM² task layer: size of the learnable task indicator embedding (gate input)
    # cgc/separate/star scenario layers: how rows reach their scenario's parameters (auto | gather | static)
    routing: str = "auto"
    # asymmetric task layer: [parent, child] pairs of schema task names, a DAG; the parent's
    # bottom output is concatenated to the child's bottom input ([] = separate bottoms)
    edges: List[List[str]] = field(default_factory=list)
    subspaces: int = 2  # sluice task layer: subspaces each layer's output is split into (divides out_dim)


@dataclass
class HeadsConfig:
    """The task heads on top of the task layers (``dlrm_mtl/modules/heads/``; fields each type
    reads: ``HEAD_FIELDS`` there — a field a type does not read must keep its default, or the
    config is refused). Every head's per-task MLP has the sizes of ``model.tower``.

    Example (YAML)::

        model: {heads: {type: aitm, calibrator_weight: 0.3}}
    """

    type: str = "towers"  # towers (independent, today's) | dbmtl | aitm | nmtr
    relation_dim: int = 32  # dbmtl: width of each task's relation layer (what its children read)
    calibrator_weight: float = 0.3  # aitm: α of the behavioural expectation calibrator (aux loss)


@dataclass
class SequenceEncoderConfig:
    """How one behaviour sequence (a schema ``sequence: true`` feature with its aligned side
    info) becomes a vector that joins the interaction like a pooled feature
    (``dlrm_mtl/modules/sequence/``).

    ``type``: ``mean`` (masked mean of the events), ``target_attention`` (DIN: each event
    weighted by an MLP of it and the target), ``lstm_attention`` (DUPN: an LSTM over the events,
    then softmax attention with the target as query). ``target``: features whose embeddings,
    concatenated, are the target (the candidate item): pooled features, or sequence features
    of ``max_len: 1`` (their one event), which may share the sequence's table as DIN does.
    ``hidden``: the attention MLP's hidden sizes; ``lstm_dim``: the LSTM's width (0 = the
    event width).

    Example (YAML)::

        model:
          sequence_encoders:
            hist_items: {type: target_attention, target: [item_id], hidden: [80, 40]}
    """

    type: str = "mean"
    target: List[str] = field(default_factory=list)
    hidden: List[int] = field(default_factory=lambda: [80, 40])
    lstm_dim: int = 0


@dataclass
class DeepMCPConfig:
    """DeepMCP's two auxiliary subnets next to the prediction subnet (the rest of the model),
    trained jointly: L = L_p + α L_m + β L_c (``dlrm_mtl/models/deepmcp.py``). Off while
    ``task`` is empty.

    Matching subnet (α = ``matching_weight``): a tanh user tower over ``user`` and an item tower
    over ``item`` (pooled features, or sequence features of max_len 1), sizes ``towers``, whose
    inner product is trained against ``task``'s label. Correlation subnet (β =
    ``correlation_weight``, off without ``sequence``): skip-gram over the events of the
    sequence ``sequence`` (its ``tanh`` projection to ``correlation_dim``), pairs at most
    ``window`` events apart, ``negatives`` in-batch negatives per pair.

    Example (YAML)::

        model:
          deepmcp: {task: ctr, user: [user_id, user_segment], item: [cand_item],
                    sequence: hist_items, matching_weight: 0.1, correlation_weight: 0.1}
    """

    task: str = ""
    user: List[str] = field(default_factory=list)
    item: List[str] = field(default_factory=list)
    towers: List[int] = field(default_factory=lambda: [64, 32])
    matching_weight: float = 0.1
    sequence: str = ""
    correlation_dim: int = 32
    window: int = 2
    negatives: int = 4
    correlation_weight: float = 0.1


@dataclass
class ModelConfig:
    # dot: DLRM pairwise dot products (+ first-order terms; every sparse feature one dim);
    # concat: dense and pooled embeddings side by side (the MMoE/PLE papers' input)
    interaction: str = "dot"
    # dense MLP hidden sizes; dot appends the embedding dim. With concat, [] passes the dense
    # features through unchanged, otherwise the last size is the MLP's output
    dense_arch: List[int] = field(default_factory=lambda: [64])
    scenario_emb_dim: int = 8  # embedding per scenario level (gate input and part of x)
    # stacked scenario layers, then stacked task layers; [] = none of that kind
    scenario_layers: List[LayerConfig] = field(default_factory=lambda: [LayerConfig(type="cgc", level="each", out_dim=128)])
    task_layers: List[LayerConfig] = field(default_factory=lambda: [LayerConfig(type="cgc", out_dim=64)])
    tower: List[int] = field(default_factory=lambda: [64])
    # what turns the last task layer's output into the T logits: independent towers (default)
    # or a task-relation head (dbmtl | aitm | nmtr) along the schema's task graph
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    # per sequence feature of the schema (its name); a sequence not named here is mean-pooled
    sequence_encoders: Dict[str, SequenceEncoderConfig] = field(default_factory=dict)
    # DeepMCP's matching and correlation subnets (auxiliary losses; off while task is "")
    deepmcp: DeepMCPConfig = field(default_factory=DeepMCPConfig)


@dataclass
class TableShardingConfig:
    """Per-table planner constraints (empty list: use the defaults)."""

    types: List[str] = field(default_factory=list)  # e.g. [row_wise]
    compute_kernels: List[str] = field(default_factory=list)  # e.g. [fused]
    # fused optimizer of this table: rowwise_adagrad (default) | adagrad | sgd (CPU and GPU;
    # fbgemm has no Adam on CPU); lr 0 = train.sparse_lr
    optimizer: str = "rowwise_adagrad"
    lr: float = 0.0


BOUNDS_CHECKS = ("none", "warning", "fatal")  # sharding.bounds_check


@dataclass
class ShardingConfig:
    # sharding types the planner may choose from. column_wise is left out by default:
    # row-wise Adagrad state under column_wise cannot be resharded (docs/checkpoints.md).
    types: List[str] = field(default_factory=lambda: ["table_wise", "row_wise", "table_row_wise"])
    # planner's HBM (GPU) or DDR (CPU) capacity per rank; 0 = read it from the hardware
    # (GPU memory, or host memory divided by the local ranks)
    memory_per_rank_gb: float = 0.0
    tables: Dict[str, TableShardingConfig] = field(default_factory=dict)  # per-table overrides
    # a world of one looks its tables up directly through their fbgemm kernels, without
    # TorchRec's input/output distribution over one rank (same tables, optimizer and
    # checkpoints; dlrm_mtl/models/local_lookup.py; on the CPU each row-wise Adagrad kernel is
    # called with the arguments its module built on the first call, recorded_lookup.py).
    # false: always the sharded module's forward
    local_lookup: bool = True
    # fbgemm's check of every id against its table before each lookup: none (the default: the
    # reader has already checked every id, or hashed it into range, and names the file, column
    # and row of a bad one; the kernel's check cost as much as the lookup itself, 130 us a step
    # on the census shape) | warning (fbgemm's default: a bad id is read as row 0, with a
    # warning) | fatal. Set warning or fatal when feeding the tables batches of your own.
    bounds_check: str = "none"
    # the world-of-one lookup's row-wise Adagrad backward on the CPU (models/recorded_lookup.py):
    # one_table (fbgemm's compiled path for a table shared by several features, the kernel's
    # tables called as one) | per_table (its JIT-compiled path, the sharded module's own) |
    # auto: one_table on Intel CPUs, where the JIT code pays ~0.45 us per updated row for
    # legacy-SSE transitions (docs/performance.md, "Ninth round"). The same row-wise Adagrad
    # to float rounding; per_table keeps the update bit for bit the sharded module's. Under
    # one_table a call whose every bag holds one id (single-hot features) is looked up as a
    # row gather, updated by fbgemm's own backward call (bit for bit the kernel's; "Twelfth round")
    cpu_backward: str = "auto"


@dataclass
class EarlyStoppingConfig:
    """The metric every evaluation is judged by: early stopping and ``checkpoint.keep_best``
    (docs/checkpoints.md, "Best checkpoint and early stopping")."""

    metric: str = "auc"  # a key of the metric rows: auc, gauc, logloss, ne, calibration, mse, mae, ...
    # a prediction name (ctr, cvr, ctcvr, ...; its `all` row), "all" (the mean over the tasks'
    # `all` rows that have the metric) or "" (the entire-space prediction of the schema's last
    # task that has the metric: ctcvr for ctr -> cvr)
    task: str = ""
    mode: str = "max"  # max | min: which way is better
    patience: int = 0  # stop after this many evaluations without improvement (0: never stop)
    min_delta: float = 0.0  # an improvement must beat the best value by more than this


@dataclass
class TrainConfig:
    run_dir: str = "runs/demo"
    epochs: int = 1
    max_steps: int = -1  # stop after this many steps per epoch when > 0
    seed: int = 0
    dense_lr: float = 3e-3  # Adam on dense parameters
    dense_weight_decay: float = 0.0
    # fused row-wise Adagrad on embedding tables. 0.05: at 0.2 the id tables over-fitted on the
    # census- and MovieLens-shaped benchmarks (AUC 0.002-0.013 below plain Adam; 0.05 within
    # 0.001-0.005) and the demo equalled or gained (CVR +0.002 to +0.009), docs/performance.md
    sparse_lr: float = 0.05
    lr_schedule: str = "cosine"  # constant | cosine: both learning rates decay to lr_min_factor x
    lr_min_factor: float = 0.05
    warmup_steps: int = 0  # linear warm-up before the schedule
    backend: str = "auto"  # auto | gloo | nccl
    # auto | sparse_dist | none: TorchRec's TrainPipelineSparseDist overlaps the next batch's
    # copy and input all-to-all with this batch's compute (auto: on GPU with 2+ ranks; a world
    # of one has no all-to-all to hide and pays the pipeline's host work. It runs and is
    # tested on CPU too, where it gives bit-identical results but no speed-up)
    pipeline: str = "auto"
    # auto | graph | eager: the dense arch + loss forward and backward replayed as one CUDA graph
    # each (docs/performance.md, "GPU"); auto: graph on CUDA in training. "graph" on CPU runs the same
    # static-buffer step without capture (the CPU twin the tests check against eager)
    cuda_graph: str = "auto"
    precision: str = "fp32"  # fp32 | bf16: autocast of the dense arch; loss and metrics stay fp32
    allow_tf32: bool = True  # CUDA: TF32 tensor-core matmuls/convolutions (fp32 range, 10-bit mantissa)
    # CPU: fp32 matmuls computed by oneDNN from bf16-rounded inputs (fp32 accumulation and
    # outputs; AMX on Intel Xeons that have it): the CPU's counterpart of allow_tf32, with an
    # 8-bit mantissa (docs/performance.md, "Ninth round")
    allow_bf16_matmul: bool = False
    # CPU: subnormal floats (below 1.2e-38) flushed to zero in every op (FTZ/DAZ): a long run's
    # gradients drift into that range and each op touching them slows down (MovieLens PLE:
    # 12 -> 17.4 ms per step over 40 epochs without it; docs/performance.md, "Tenth round")
    flush_denormal: bool = True
    threads_per_rank: int = 0  # torch intra-op threads; 0 = the cores this process may use / local world size
    # glibc: keep freed host memory in the process (mallopt), so that every step's large
    # temporaries reuse pages instead of faulting in fresh ones, and on the CPU one malloc
    # arena and pyarrow on that malloc, so that memory the reader's threads and pyarrow freed
    # serves the training thread too (dlrm_mtl/host_memory.py)
    keep_host_memory: bool = True
    # CPU: fused C kernels (dlrm_mtl/native.py, built at install) for chains of small operators
    # in the step, e.g. the loss terms; off, or where the extension is missing, the ATen paths
    native_kernels: bool = True
    # CPU, world of one, with the C kernels: the first layer's backward on the lookup's input x
    # by table row instead of by batch row (small tables: far fewer products; the same sums to
    # float rounding; dlrm_mtl/modules/folded_affine.py); off: x's gradient and two GEMMs
    fold_first_layer: bool = True
    timeout_s: int = 120  # collective timeout: a dead rank ends the job instead of hanging it
    log_every: int = 50
    eval_every_epoch: bool = True
    # evaluate every N optimizer steps inside an epoch too (0: off); each evaluation is logged
    # at its step and read by early stopping and checkpoint.keep_best (docs/checkpoints.md)
    eval_every_steps: int = 0
    # evaluate the first rows of the eval set only (0: all of it): ceil(eval_rows / (eval batch x
    # world size)) batches per rank (data.eval_batch_size), the same count on every rank
    eval_rows: int = 0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    progress: bool = True  # rank 0 prints a line per log window: step, rows, loss, samples/s, epoch ETA


@dataclass
class CheckpointConfig:
    """Sharded, atomic checkpoints and resume (docs/checkpoints.md)."""

    dir: str = ""  # default: <train.run_dir>/checkpoints
    every_steps: int = 0  # save every N optimizer steps (0: off)
    every_minutes: float = 0.0  # save when M minutes passed since the last one (0: off)
    keep_last: int = 3  # complete step checkpoints kept (final and best are always kept)
    # save `best` at every evaluation that improves train.early_stopping's metric (never pruned)
    keep_best: bool = True
    at_end: bool = True  # save `final` when training ends
    # "" = resume from the latest complete checkpoint only when the launcher restarted the job
    # (torchrun's TORCHELASTIC_RESTART_COUNT > 0), else start fresh; "auto" = the latest complete
    # one if any; "none" = never; "best" = <checkpoint.dir>/best; or a checkpoint directory
    resume: str = ""
    # load the weights only and start the optimizer state afresh (the fallback where TorchRec
    # cannot reshard a state, e.g. row-wise Adagrad to/from column_wise); step, epoch and
    # data position are still restored
    model_only: bool = False
    # resuming a run that already finished (every epoch done, metrics.json written) trains
    # nothing and keeps its metrics.json; true evaluates the final weights again and overwrites it
    reevaluate_finished: bool = False
    min_free_gb: float = 0.0  # refuse to start when the checkpoint disk has less free space (0: estimate)
    # append the row ids trained at every step to <run_dir>/audit/rankN.rows (tests, audits);
    # a resume truncates them back to the checkpoint's step
    audit_rows: bool = False


@dataclass
class RankingConfig:
    """A ranking term next to the pointwise ones (dlrm_mtl/ranking_loss.py, docs/tasks.md):
    ``type`` pairwise (BPR over positive-negative pairs of ``task``'s label within a request
    group) or listwise (ListNet top-one softmax cross-entropy per group), ``group`` the schema
    column of the request id (must be the schema's ``group_id``), ``task`` a binary task with a
    head, ``weight`` λ of the term. ``type: none`` (the default) adds nothing.

    Example::

        loss: {ranking: {type: pairwise, group: request_id, task: ctr, weight: 0.5}}
    """

    type: str = "none"  # none | pairwise | listwise
    group: str = ""
    task: str = ""
    weight: float = 1.0


@dataclass
class LossConfig:
    """Loss weighting (docs/tasks.md). Keys of the per-task maps are schema task names.

    Total loss = Σ_scenario-weighted terms:
    ``Σ_k w_k · γ_k^t · u_k(L_k) + aux_weight · Σ aux``, with w_k the static weight
    (``task_weights[k]``, else the schema's ``Task.weight``), γ_k the PLE decay (``decay``,
    PLE eq. 10, t = training step), u_k the identity (``weighting: static``) or Kendall et al.'s
    uncertainty term (``weighting: uncertainty``: exp(−s_k)·L_k + s_k/2 for binary tasks,
    exp(−s_k)·L_k/2 + s_k/2 for regression, s_k = log σ_k² learnable) or DWA's λ_k · L_k
    (``weighting: dwa``, Liu et al. 2019: λ recomputed after every epoch from the ratio of each
    task's last two epoch-mean losses, temperature ``dwa_temperature``) or a weight from the
    per-task gradients on the last shared layer W (``shared_layer``), recomputed every step:
    ``weighting: gradnorm`` (Chen et al. 2018, eq. 1-2: learnable w, Σ w = K, one step of
    ``gradnorm_lr`` on L_grad with asymmetry ``gradnorm_alpha``) or ``weighting: pareto`` (Lin
    et al. 2019, PE-LTR: ω minimising ||Σ ω_k ∇_W L_k||² with Σ ω = 1, ω_k >= c_k from
    ``pareto_bounds``, solver ``pareto_solver``); dlrm_mtl/loss_balancing.py. Rows are weighted by
    λ of their leaf scenario (HiNet): ``scenario_weighting: none`` (λ = 1), ``static``
    (``scenario_weights`` by leaf name, e.g. ``home/hot_card``, default 1) or
    ``inverse_share`` (λ_s = 1 / (S · share_s): every scenario carries the same total weight;
    shares from ``scenario_shares`` or counted on the training data).
    """

    weighting: str = "static"  # static | uncertainty | dwa | gradnorm | pareto
    # DWA (Liu et al. 2019, eq. 1): λ_k = K · softmax(r / T)_k per epoch, r_k = L_k(t-1) / L_k(t-2)
    dwa_temperature: float = 2.0
    # GradNorm (Chen et al. 2018, eq. 1-2): asymmetry α and the learning rate of w's own
    # gradient step (plain gradient descent on L_grad, every training step)
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    # PE-LTR (Lin et al. 2019): lower bound c_k of each task's weight (default 0; Σ c <= 1) and
    # the solver of min ||Σ ω_k ∇L_k||²: exact (active-set enumeration) | pec (the paper's
    # Algorithm 2: relaxed solution, then projection); K = 2 always takes the closed form
    pareto_bounds: Dict[str, float] = field(default_factory=dict)
    pareto_solver: str = "exact"
    # gradnorm / pareto: the dense-arch module whose weights W the per-task gradients are taken
    # on ("" = the last module every task reads: the last scenario layer, else a leading
    # shared-bottom task layer, else the dense MLP), e.g. scenario_layers.1, task_layers.0
    shared_layer: str = ""
    task_weights: Dict[str, float] = field(default_factory=dict)
    decay: Dict[str, float] = field(default_factory=dict)  # γ_k per task (PLE); 1 = no decay
    uncertainty_init: float = 0.0  # initial s_k = log σ_k²
    scenario_weighting: str = "none"  # none | static | inverse_share
    scenario_weights: Dict[str, float] = field(default_factory=dict)
    scenario_shares: Dict[str, float] = field(default_factory=dict)  # leaf name -> share of training rows
    aux_weight: float = 1.0  # multiplies the model's auxiliary losses (already weighted per layer)
    bias_tower: List[int] = field(default_factory=lambda: [16])  # hidden sizes of the position-bias tower
    ranking: RankingConfig = field(default_factory=RankingConfig)  # optional ranking term (type: none = off)


@dataclass
class PredictConfig:
    """Scores of ``dlrm-mtl predict`` and of the exported model (docs/serving.md)."""

    # fused ranking score (PLE, Tang et al. 2020, eq. 1): Π p_name ^ w_name over prediction
    # names (a task's own probability by its name, a chained task's entire-space one by its
    # entire name, e.g. {ctr: 1, ctcvr: 2}); {} = weight 1 on the entire-space probability of
    # every task that is no other task's parent (pCTCVR for ctr -> cvr)
    fusion: Dict[str, float] = field(default_factory=dict)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    # where load() read each key from (not a field: not saved, compared or printed)
    _origins: ClassVar[Origins] = {}

    # ------------------------------------------------------------------ errors
    def origin(self, key: str) -> str:
        """The config file that set ``key`` (or the section or list holding it), "" when it
        came from a ``--set`` override or is a default."""
        return _origin(self._origins, key)

    def error(self, key: str, problem: str) -> ConfigError:
        """``FILE: key: problem`` (``key: problem`` when no file set the key)."""
        return self.locate(ConfigError(f"{key}: {problem}", key))

    def locate(self, e: ConfigError) -> ConfigError:
        """``e`` with the file that set its key in front of the message."""
        return _located(e, self._origins)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        return _build(cls, d or {}, "")

    @classmethod
    def load(cls, path: Union[None, str, Sequence[str]] = None, overrides: Sequence[str] = ()) -> "Config":
        """YAML file(s) then ``key=value`` overrides. Several files compose: mappings merge
        recursively and a later file's value (scalar or list) replaces an earlier one."""
        d: Dict[str, Any] = {}
        origins: Origins = {}
        paths = [path] if isinstance(path, str) else list(path or [])
        for p in paths:
            _merge(d, _read_file(p), origins, str(p), ())
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"--set {ov!r}: expected key=value")
            key, raw = ov.split("=", 1)
            keys = key.strip().split(".")
            _set_path(d, keys, _parse_value(key.strip(), raw))
            _forget(origins, tuple(keys))
            origins[tuple(keys)] = ""
        try:
            cfg = cls.from_dict(d)
        except ConfigError as e:
            raise _located(e, origins) from None
        cfg._origins = origins
        return cfg

    def save(self, path: Union[str, Path]) -> None:
        with open(path, "w") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False)


def read_yaml(path: Union[str, Path], error: Callable[[str], Exception], what: str) -> Any:
    """The YAML document of ``path``; a missing or unreadable file or bad YAML raises
    ``error(message)`` naming the file (``what``: "config", "schema")."""
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except OSError as e:
        raise error(f"{path}: cannot read the {what} file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: invalid YAML: {yaml_problem(e)}") from None


def _read_file(path: str) -> Dict[str, Any]:
    """One config file's mapping; a missing file, unreadable file or bad YAML is a ConfigError."""
    loaded = read_yaml(path, ConfigError, "config") or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def _parse_value(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: invalid YAML value {raw!r}: {yaml_problem(e)}", key) from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what went wrong and where (PyYAML's own text spans lines)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = "; ".join(x for x in (e.context, e.problem) if x)
        return f"{what}{where}"
    return " ".join(str(e).split())


def _merge(into: Dict[str, Any], other: Dict[str, Any], origins: Origins, source: str, at: Tuple[str, ...]) -> None:
    for k, v in other.items():
        here = at + (str(k),)
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v, origins, source, here)
        else:
            into[k] = v
            _forget(origins, here)
            origins[here] = source


def _forget(origins: Origins, prefix: Tuple[str, ...]) -> None:
    """Drops the origins of ``prefix`` and of every key under it (a later source replaced it)."""
    for k in [k for k in origins if k[: len(prefix)] == prefix]:
        del origins[k]


def _origin(origins: Origins, key: str) -> str:
    """The source of the longest recorded prefix of ``key`` ("" when none)."""
    parts = tuple(p for p in re.sub(r"\[\d+\]", "", key).split(".") if p)
    for n in range(len(parts), 0, -1):
        if parts[:n] in origins:
            return origins[parts[:n]]
    return ""


def _located(e: ConfigError, origins: Origins) -> ConfigError:
    source = _origin(origins, e.key) if e.key else ""
    if not source or str(e).startswith(source + ":"):
        return e
    return ConfigError(f"{source}: {e}", e.key)


def _set_path(d: Dict[str, Any], keys: List[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {k!r} is not a section", ".".join(keys))
    d[keys[-1]] = value


def _build(kind: type, d: Dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}", prefix.rstrip("."))
    hints = get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(prefix + str(k) for k in set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(names)}", unknown[0])
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return kind(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        args = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, where)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}", where)
        _, arg = get_args(tp)
        return {str(k): _coerce(arg, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}", where)
        (arg,) = get_args(tp)
        return [_coerce(arg, v, where) for v in value]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}", where)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}", where)
    return value


# ---------------------------------------------------------------------------- check
def check(cfg: Config, schema: "Schema") -> None:
    """Everything about ``cfg`` that is known before data is read or a process group starts:
    :func:`check_values`, the choices defined by the stack (CUDA graph modes, precisions,
    sharding types, kernels, table optimizers) and the dense arch and loss built on the
    ``meta`` device (layer types, gates, routing, scenario levels, loss weights; no memory,
    no compute). Raises a ConfigError naming the key and, where a file set it, the file.

    Example::

        cfg = Config.load("configs/demo.yaml", ["data.batch_size=0"])
        check(cfg, Schema.load(cfg.data.schema_path()))  # ConfigError: data.batch_size: must be >= 1, got 0
    """
    check_values(cfg, schema)
    _check_stack_choices(cfg)
    _check_built(cfg, schema)


def check_values(cfg: Config, schema: "Schema") -> None:
    """The part of :func:`check` that needs no torch (fails fast, before the stack import):
    value ranges and choices, layer counts and sizes, and the config against ``schema``
    (the dot interaction's single embedding dim, the tables of per-table overrides)."""
    _check_data(cfg)
    _check_train(cfg)
    _check_checkpoint(cfg)
    _check_model(cfg)
    _check_loss(cfg)
    _check_tables(cfg, schema)
    _check_interaction(cfg, schema)
    _check_fusion(cfg, schema)
    _check_early_stopping(cfg, schema)
    check_ranking_schema(cfg, schema)


def _check_fusion(cfg: Config, schema: "Schema") -> None:
    from dlrm_mtl.scoring import fusion_weights

    try:
        fusion_weights(schema, cfg.predict.fusion)
    except ValueError as e:
        raise cfg.error("predict.fusion", str(e)) from None


# the least value of each integer field of a layer (a count or size below it builds nothing)
LAYER_MINIMUM: Dict[str, int] = {
    "num_shared": 0, "num_specific": 0, "num_experts": 1, "out_dim": 1, "levels": 1, "sub_experts": 1,
    "top_k": 0, "k_specific": 0, "k_shared": 0, "task_emb_dim": 1, "subspaces": 1,
}


def check_layer_sizes(c: LayerConfig, where: str) -> None:
    """The counts, sizes and weights of one layer (``where``: its key, ``model.task_layers[0]``)."""
    for name, least in LAYER_MINIMUM.items():
        if getattr(c, name) < least:
            raise ConfigError(f"{where}.{name}: must be >= {least}, got {getattr(c, name)} (type {c.type})", f"{where}.{name}")
    if any(h < 1 for h in c.hidden):
        raise ConfigError(f"{where}.hidden: sizes must be >= 1, got {c.hidden} (type {c.type})", f"{where}.hidden")
    for name in ("noise", "aux_weight"):
        if getattr(c, name) < 0:
            raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(c, name)} (type {c.type})", f"{where}.{name}")


def _at_least(cfg: Config, key: str, value: float, least: float) -> None:
    if value < least:
        raise cfg.error(key, f"must be >= {least}, got {value}")


def _one_of(cfg: Config, key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise cfg.error(key, f"{value!r} is not one of {list(choices)}")


def _sizes(cfg: Config, key: str, sizes: List[int]) -> None:
    if any(s < 1 for s in sizes):
        raise cfg.error(key, f"layer sizes must be >= 1, got {sizes}")


def _check_data(cfg: Config) -> None:
    d = cfg.data
    _at_least(cfg, "data.batch_size", d.batch_size, 1)
    _at_least(cfg, "data.eval_batch_size", d.eval_batch_size, 0)
    _at_least(cfg, "data.shuffle_buffer_rows", d.shuffle_buffer_rows, 0)
    _at_least(cfg, "data.prefetch_batches", d.prefetch_batches, -1)
    _at_least(cfg, "data.num_workers", d.num_workers, -1)
    _at_least(cfg, "data.cache_mb", d.cache_mb, -1)
    _one_of(cfg, "data.background_priority", d.background_priority, ("idle", "normal"))
    _one_of(cfg, "data.last_batch", d.last_batch, ("auto", "padded", "short"))
    _one_of(cfg, "sharding.bounds_check", cfg.sharding.bounds_check, BOUNDS_CHECKS)
    _one_of(cfg, "sharding.cpu_backward", cfg.sharding.cpu_backward, ("auto", "one_table", "per_table"))


def _check_train(cfg: Config) -> None:
    t = cfg.train
    _at_least(cfg, "train.epochs", t.epochs, 0)
    for key in ("dense_lr", "dense_weight_decay", "sparse_lr", "lr_min_factor", "warmup_steps", "threads_per_rank"):
        _at_least(cfg, f"train.{key}", getattr(t, key), 0)
    _at_least(cfg, "train.timeout_s", t.timeout_s, 1)
    _at_least(cfg, "train.log_every", t.log_every, 1)
    _one_of(cfg, "train.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _one_of(cfg, "train.backend", t.backend, ("auto", "gloo", "nccl"))
    _one_of(cfg, "train.pipeline", t.pipeline, ("auto", "sparse_dist", "none"))
    _at_least(cfg, "train.eval_every_steps", t.eval_every_steps, 0)
    _at_least(cfg, "train.eval_rows", t.eval_rows, 0)
    es = t.early_stopping
    _one_of(cfg, "train.early_stopping.mode", es.mode, ("max", "min"))
    _at_least(cfg, "train.early_stopping.patience", es.patience, 0)
    _at_least(cfg, "train.early_stopping.min_delta", es.min_delta, 0)
    _one_of(cfg, "train.early_stopping.metric", es.metric, BINARY_METRICS + REGRESSION_METRICS)


# metric keys of the metric rows (dlrm_mtl/metrics.py) early stopping can track, by view type
BINARY_METRICS: Tuple[str, ...] = ("auc", "gauc", "oracle_auc", "logloss", "ne", "calibration", "positive_rate")
REGRESSION_METRICS: Tuple[str, ...] = ("mse", "mae", "oracle_mse", "label_mean", "pred_mean")


def tracked_predictions(schema: "Schema", metric: str, task: str) -> List[str]:
    """The prediction names whose ``all`` rows ``train.early_stopping`` averages (one, unless
    ``task`` is ``all``): ``task`` itself, every prediction with ``metric`` (``all``), or the
    entire-space prediction of the last task with ``metric`` (``""``). Raises ValueError
    when the prediction has no such metric or none has it."""
    from dlrm_mtl.scoring import prediction_names

    regression = {t.name for t in schema.tasks if t.type == "regression"}
    gauc_ok = schema.user_id is not None

    def has(name: str) -> bool:
        if name in regression:
            return metric in REGRESSION_METRICS
        return metric in BINARY_METRICS and (metric != "gauc" or gauc_ok)

    names = prediction_names(schema)
    if task == "all":
        found = [n for n in names if has(n)]
    elif task == "":
        last = [t for t in schema.tasks if has(t.name if t.type == "regression" else schema.entire_name(t))]
        found = [] if not last else [last[-1].name if last[-1].type == "regression" else schema.entire_name(last[-1])]
    elif task not in names:
        raise ValueError(f"{task!r} is not a prediction of this schema; known: {names} (or all)")
    else:
        found = [task] if has(task) else []
        if not found:
            raise ValueError(f"prediction {task!r} has no {metric!r} metric")
    if not found:
        raise ValueError(f"no prediction of this schema has a {metric!r} metric" + ("" if gauc_ok or metric != "gauc" else " (gauc needs the schema's user_id)"))
    return found


def _check_early_stopping(cfg: Config, schema: "Schema") -> None:
    es = cfg.train.early_stopping
    if es.patience == 0 and not cfg.checkpoint.keep_best:
        return  # nothing reads the metric
    try:
        tracked_predictions(schema, es.metric, es.task)
    except ValueError as e:
        key = "train.early_stopping.task" if es.task else "train.early_stopping.metric"
        raise cfg.error(key, f"{e} (early stopping and checkpoint.keep_best track it)") from None


def _check_checkpoint(cfg: Config) -> None:
    for key in ("every_steps", "every_minutes", "keep_last", "min_free_gb"):
        _at_least(cfg, f"checkpoint.{key}", getattr(cfg.checkpoint, key), 0)


def _check_model(cfg: Config) -> None:
    m = cfg.model
    _one_of(cfg, "model.interaction", m.interaction, ("dot", "concat"))
    _sizes(cfg, "model.dense_arch", m.dense_arch)
    _sizes(cfg, "model.tower", m.tower)
    _at_least(cfg, "model.scenario_emb_dim", m.scenario_emb_dim, 1)
    for kind in ("scenario_layers", "task_layers"):
        for i, layer in enumerate(getattr(m, kind)):
            try:
                check_layer_sizes(layer, f"model.{kind}[{i}]")
            except ConfigError as e:
                raise cfg.locate(e) from None


def _check_loss(cfg: Config) -> None:
    lc = cfg.loss
    _sizes(cfg, "loss.bias_tower", lc.bias_tower)
    _at_least(cfg, "loss.aux_weight", lc.aux_weight, 0)
    _one_of(cfg, "loss.weighting", lc.weighting, ("static", "uncertainty", "dwa", "gradnorm", "pareto"))
    if lc.dwa_temperature <= 0:
        raise cfg.error("loss.dwa_temperature", f"must be > 0, got {lc.dwa_temperature}")
    _check_gradient_weighting(cfg)
    _check_ranking(cfg)
    for what in ("task_weights", "scenario_weights", "scenario_shares"):
        for name, value in getattr(lc, what).items():
            _at_least(cfg, f"loss.{what}.{name}", value, 0)


def _check_ranking(cfg: Config) -> None:
    """``loss.ranking``: its type, a group column and a task when on, λ >= 0 (the schema
    checks — task, group column — are :func:`check_ranking_schema`'s)."""
    r = cfg.loss.ranking
    _one_of(cfg, "loss.ranking.type", r.type, ("none", "pairwise", "listwise"))
    _at_least(cfg, "loss.ranking.weight", r.weight, 0)
    if r.type == "none":
        return
    if not r.group:
        raise cfg.error("loss.ranking.group", f"type {r.type} needs the group column (the request id), got ''")
    if not r.task:
        raise cfg.error("loss.ranking.task", f"type {r.type} needs the task whose logits it ranks, got ''")


def check_ranking_schema(cfg: Config, schema: "Schema") -> None:
    """``loss.ranking`` against the schema: a binary task with a head, and ``group`` = the
    schema's ``group_id`` column (the one the reader carries as ``Batch.group``)."""
    r = cfg.loss.ranking
    if r.type == "none":
        return
    by_name = {t.name: t for t in schema.tasks}
    t = by_name.get(r.task)
    if t is None:
        raise cfg.error("loss.ranking.task", f"{r.task!r} is not a task of the schema; tasks are {list(by_name)}")
    if t.type != "binary" or t.derived:
        raise cfg.error("loss.ranking.task", f"{r.task!r} must be a binary task with its own head (type {t.type}"
                        f"{', sum_of' if t.derived else ''})")
    if r.group != schema.group_id:
        raise cfg.error("loss.ranking.group", f"{r.group!r} is not the schema's group_id column ({schema.group_id!r}); "
                        "declare `group_id: <column>` in schema.yaml")


def _check_gradient_weighting(cfg: Config) -> None:
    """GradNorm's α and learning rate, PE-LTR's bounds (each >= 0, Σ <= 1) and solver; both
    need the eager dense step (per-task gradients and an all-reduce inside the forward)."""
    lc = cfg.loss
    _at_least(cfg, "loss.gradnorm_alpha", lc.gradnorm_alpha, 0)
    if lc.gradnorm_lr <= 0:
        raise cfg.error("loss.gradnorm_lr", f"must be > 0, got {lc.gradnorm_lr}")
    _one_of(cfg, "loss.pareto_solver", lc.pareto_solver, ("exact", "pec"))
    for name, value in lc.pareto_bounds.items():
        _at_least(cfg, f"loss.pareto_bounds.{name}", value, 0)
    if sum(lc.pareto_bounds.values()) > 1 + 1e-9:
        raise cfg.error("loss.pareto_bounds", f"the bounds must sum to <= 1, got {sum(lc.pareto_bounds.values()):g} ({lc.pareto_bounds})")
    if lc.weighting in ("gradnorm", "pareto") and cfg.train.cuda_graph == "graph":
        raise cfg.error("train.cuda_graph", f"graph cannot record loss.weighting {lc.weighting} (per-task gradients and an "
                        "all-reduce inside the step); use auto or eager")


def _check_tables(cfg: Config, schema: "Schema") -> None:
    _at_least(cfg, "sharding.memory_per_rank_gb", cfg.sharding.memory_per_rank_gb, 0)
    tables = sorted({f.table for f in schema.sparse + schema.sequence})
    for name, tc in cfg.sharding.tables.items():
        if name not in tables:
            raise cfg.error(f"sharding.tables.{name}", f"{name!r} is not a table of the schema {tables}")
        _at_least(cfg, f"sharding.tables.{name}.lr", tc.lr, 0)


def _check_stack_choices(cfg: Config) -> None:
    """The values whose choices torch, TorchRec and the training step define."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.types import ShardingType

    from dlrm_mtl.distributed import TABLE_OPTIMIZERS
    from dlrm_mtl.models.dense_step import CUDA_GRAPH_MODES, PRECISIONS

    _one_of(cfg, "train.cuda_graph", cfg.train.cuda_graph, CUDA_GRAPH_MODES)
    _one_of(cfg, "train.precision", cfg.train.precision, PRECISIONS)
    types = [s.value for s in ShardingType]
    kernels = [k.value for k in EmbeddingComputeKernel]
    for t in cfg.sharding.types:
        _one_of(cfg, "sharding.types", t, types)
    for name, tc in cfg.sharding.tables.items():
        for t in tc.types:
            _one_of(cfg, f"sharding.tables.{name}.types", t, types)
        for k in tc.compute_kernels:
            _one_of(cfg, f"sharding.tables.{name}.compute_kernels", k, kernels)
        _one_of(cfg, f"sharding.tables.{name}.optimizer", tc.optimizer, sorted(TABLE_OPTIMIZERS))


def _check_interaction(cfg: Config, schema: "Schema") -> None:
    """The dot interaction's one embedding dim for every sparse feature of the schema."""
    by_dim: Dict[int, List[str]] = {}
    for i, f in enumerate(schema.sparse):
        by_dim.setdefault(f.dim, []).append(f"sparse[{i}] {f.name}")
    if cfg.model.interaction != "dot" or len(by_dim) == 1:
        return
    shown = "; ".join(f"dim {d}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}" for d, names in sorted(by_dim.items()))
    raise cfg.error("model.interaction", f"dot needs one embedding dim for every sparse feature, but the schema "
                    f"{_schema_file(cfg, schema)} has {shown} (use model.interaction: concat, or one dim)")


def _schema_file(cfg: Config, schema: "Schema") -> str:
    try:
        return cfg.data.schema_path()
    except ConfigError:
        return repr(schema.name)


def _check_built(cfg: Config, schema: "Schema") -> None:
    """The dense arch of ``cfg`` built on the meta device and its loss (a few small buffers,
    on the CPU: it reads scenario shares back): what their constructors refuse (layer types,
    gates, routing, scenario levels, loss weights) as a ConfigError."""
    import torch

    from dlrm_mtl.losses import EntireSpaceLoss
    from dlrm_mtl.models.ranking_model import DenseArch

    try:
        with torch.device("meta"):
            arch = DenseArch(schema, cfg.model)
        EntireSpaceLoss(schema, cfg.loss).bind_shared(arch)  # gradnorm/pareto: loss.shared_layer resolved
    except ConfigError as e:
        raise cfg.locate(e) from None
    except ValueError as e:  # the loss names its key at the start of the message (loss.decay.ctr: ...)
        key = re.match(r"(data|model|sharding|train|checkpoint|loss)(\.\w+)+", str(e))
        raise cfg.locate(ConfigError(str(e), key.group(0) if key else "")) from None
