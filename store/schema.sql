-- ifledger schema. Tables are append-only except runs.status; views hold every metric's one definition.
-- Sign convention everywhere: effect = measurement(without the set) - measurement(full data).

CREATE TABLE IF NOT EXISTS studies (
    study_hash   VARCHAR PRIMARY KEY,
    study        VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    config       JSON NOT NULL,
    n_train      INTEGER NOT NULL,
    n_params     INTEGER NOT NULL,
    created_at   TIMESTAMP NOT NULL,
    default_regimes VARCHAR[]  -- the regimes `verify` retrains when not told (so `status` need not load the study)
);
-- ledgers written before studies recorded their default regimes (idempotent; NULL until registered again)
ALTER TABLE studies ADD COLUMN IF NOT EXISTS default_regimes VARCHAR[];
-- how a study's runs pair with the full-data run of their seed: `masked` (the engine's, and a study trainer's that
-- masks) or `dropped` (a study trainer's data loader drops the set: batches differ); NULL in rows written before it
ALTER TABLE studies ADD COLUMN IF NOT EXISTS pairing VARCHAR;

CREATE TABLE IF NOT EXISTS measurements (
    study_hash     VARCHAR NOT NULL,
    measurement_id VARCHAR NOT NULL,
    description    VARCHAR,
    PRIMARY KEY (study_hash, measurement_id)
);
-- ledgers written before measurements declared a gradient and facets (idempotent; NULL on their rows):
-- differentiable = false: no method predicts it (a rank, an accuracy); tags: the study's facets of it (JSON)
ALTER TABLE measurements ADD COLUMN IF NOT EXISTS differentiable BOOLEAN;
ALTER TABLE measurements ADD COLUMN IF NOT EXISTS tags JSON;

CREATE TABLE IF NOT EXISTS removal_sets (
    set_id      VARCHAR PRIMARY KEY,
    study_hash  VARCHAR NOT NULL,
    kind        VARCHAR NOT NULL,
    label       VARCHAR NOT NULL,
    size        INTEGER NOT NULL,
    indices     INTEGER[] NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    ranked_by   VARCHAR,  -- top_k only: the ranking method, the measurement ranked against, the direction
    target      VARCHAR,
    direction   VARCHAR,
    new_labels  DOUBLE[]  -- relabel sets only: the new label of each point of `indices` (NULL: the points are removed)
);
-- ledgers written before top_k sets had their own columns (idempotent; their labels were top_k:M:T:D:k=K)
ALTER TABLE removal_sets ADD COLUMN IF NOT EXISTS ranked_by VARCHAR;
ALTER TABLE removal_sets ADD COLUMN IF NOT EXISTS target VARCHAR;
ALTER TABLE removal_sets ADD COLUMN IF NOT EXISTS direction VARCHAR;
ALTER TABLE removal_sets ADD COLUMN IF NOT EXISTS new_labels DOUBLE[];  -- ledgers written before relabel sets
UPDATE removal_sets SET ranked_by = split_part(label, ':', 2), target = split_part(label, ':', 3),
       direction = split_part(label, ':', 4)
WHERE kind = 'top_k' AND ranked_by IS NULL;

CREATE TABLE IF NOT EXISTS predictions (
    seq            BIGINT PRIMARY KEY,
    prediction_id  VARCHAR NOT NULL UNIQUE,
    study_hash     VARCHAR NOT NULL,
    method         VARCHAR NOT NULL,
    config_hash    VARCHAR NOT NULL,
    method_config  JSON NOT NULL,
    set_id         VARCHAR NOT NULL,
    measurement_id VARCHAR NOT NULL,
    predicted      DOUBLE NOT NULL,
    code_version   VARCHAR NOT NULL,
    registered_at  TIMESTAMP NOT NULL,
    prev_hash      VARCHAR NOT NULL,
    row_hash       VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    run_id      VARCHAR PRIMARY KEY,
    study_hash  VARCHAR NOT NULL,
    set_id      VARCHAR NOT NULL,
    seed        INTEGER NOT NULL,
    regime      VARCHAR NOT NULL,
    status      VARCHAR NOT NULL,
    reason      VARCHAR,
    seconds     DOUBLE,
    train_loss  DOUBLE,
    converged   BOOLEAN,
    finished_at TIMESTAMP,
    pid         INTEGER,
    host        VARCHAR,
    started_at  TIMESTAMP,
    pid_start   BIGINT
);
-- ledgers written before runs were claimed as `running` (idempotent)
ALTER TABLE runs ALTER COLUMN finished_at DROP NOT NULL;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid INTEGER;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS host VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS started_at TIMESTAMP;
-- ledgers written before a claim recorded its process's start time (so that a reused pid is not taken as alive)
ALTER TABLE runs ADD COLUMN IF NOT EXISTS pid_start BIGINT;

-- the flow run (register, verify, run) that wrote a prediction or finished a run; NULL in older ledgers
ALTER TABLE runs ADD COLUMN IF NOT EXISTS invocation_id VARCHAR;
-- the sha256 of the checkpoint file a study's own trainer wrote for the run; NULL for the engine's runs
ALTER TABLE runs ADD COLUMN IF NOT EXISTS checkpoint_sha256 VARCHAR;
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS invocation_id VARCHAR;

CREATE TABLE IF NOT EXISTS invocations (
    invocation_id VARCHAR PRIMARY KEY,
    command       VARCHAR NOT NULL,
    config        JSON NOT NULL,
    code_version  VARCHAR NOT NULL,
    started_at    TIMESTAMP NOT NULL
);

-- A scoring method (a peer library) that ran and failed on a study: its reason, recorded instead of predictions
CREATE TABLE IF NOT EXISTS prediction_failures (
    failure_id    VARCHAR PRIMARY KEY,
    study_hash    VARCHAR NOT NULL,
    method        VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    method_config JSON NOT NULL,
    reason        VARCHAR NOT NULL,
    code_version  VARCHAR NOT NULL,
    invocation_id VARCHAR,
    failed_at     TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS outcomes (
    run_id         VARCHAR NOT NULL,
    measurement_id VARCHAR NOT NULL,
    value          DOUBLE NOT NULL,
    PRIMARY KEY (run_id, measurement_id)
);

-- A model's serialized parameters are the BLOB `params`, or, above store.model_files.MODEL_FILE_BYTES, the file
-- `<ledger>.models/<params_sha256>.pt` (content-addressed; `params` is then NULL).
CREATE TABLE IF NOT EXISTS models (
    study_hash VARCHAR NOT NULL,
    seed       INTEGER NOT NULL,
    params     BLOB,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (study_hash, seed)
);
ALTER TABLE models ADD COLUMN IF NOT EXISTS supplied_sha256 VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS retrained_distance DOUBLE;
ALTER TABLE models ADD COLUMN IF NOT EXISTS retrained_relative_distance DOUBLE;
ALTER TABLE models ADD COLUMN IF NOT EXISTS params_sha256 VARCHAR;
ALTER TABLE models ALTER COLUMN params DROP NOT NULL;

-- The hash chain of everything that decides a verdict (store/chain.py): one entry per chained row (a retried
-- failed run gets a new one). entry_hash = sha256(prev_hash, seq, entry, key, content, legacy), or an HMAC under
-- IFLEDGER_KEY (keyed). Claims (`running` runs) are queue state and are not chained.
CREATE TABLE IF NOT EXISTS chain (
    seq         BIGINT PRIMARY KEY,
    entry       VARCHAR NOT NULL,
    key         VARCHAR NOT NULL,
    content     JSON NOT NULL,
    legacy      BOOLEAN NOT NULL,
    keyed       BOOLEAN NOT NULL,
    recorded_at TIMESTAMP NOT NULL,
    prev_hash   VARCHAR NOT NULL,
    entry_hash  VARCHAR NOT NULL
);

-- Chain positions: each prediction's first entry, and each run's first entry that recorded it `done`.
CREATE OR REPLACE VIEW chain_positions AS
SELECT entry, key, min(seq) AS seq
FROM chain
WHERE entry IN ('predictions', 'predicted_weight_changes') OR (entry = 'runs' AND content->>'status' = 'done')
GROUP BY ALL;

-- The full-data models a study supplied (trained elsewhere) beside the recipe's retraining of the same seed:
-- reproduced = ‖θ_supplied − θ_retrained‖ / ‖θ_retrained‖ <= 1e-6 (store.records.SUPPLIED_TOLERANCE: a retraining that
-- reproduces the checkpoint lands within rounding of it); false when farther, or when that retraining failed (no
-- distance). Where it is false, predictions are made on a model that `scratch` does not retrain.
CREATE OR REPLACE VIEW supplied_models AS
SELECT st.study, m.study_hash, m.seed, m.supplied_sha256, m.retrained_distance, m.retrained_relative_distance,
       coalesce(m.retrained_relative_distance <= 1e-6, false) AS reproduced
FROM models m JOIN studies st USING (study_hash)
WHERE m.supplied_sha256 IS NOT NULL;

-- Per-seed paired differences: the set's run minus the full-data run of the same seed and regime. converged: the
-- optimisation of both runs came to rest (false when either stopped at its budget first: pbrf at `pbrf_steps`).
-- other_model: a `scratch` effect of a seed whose supplied model the recipe does not reproduce (supplied_models):
-- it is about the recipe's model, not the model the predictions were made on.
CREATE OR REPLACE VIEW seed_effects AS
SELECT r.study_hash, r.set_id, r.regime, r.seed, o.measurement_id,
       o.value - b.value AS effect, r.finished_at, c.seq AS chain_seq,
       r.converged IS NOT false AND rb.converged IS NOT false AS converged,
       r.regime = 'scratch' AND sm.reproduced IS NOT DISTINCT FROM false AS other_model
FROM runs r
LEFT JOIN chain_positions c ON c.entry = 'runs' AND c.key = r.run_id
LEFT JOIN supplied_models sm ON sm.study_hash = r.study_hash AND sm.seed = r.seed
JOIN removal_sets s ON s.set_id = r.set_id AND s.kind <> 'full'
JOIN outcomes o ON o.run_id = r.run_id
JOIN removal_sets fs ON fs.study_hash = r.study_hash AND fs.kind = 'full'
JOIN runs rb ON rb.set_id = fs.set_id AND rb.seed = r.seed AND rb.regime = r.regime AND rb.status = 'done'
JOIN outcomes b ON b.run_id = rb.run_id AND b.measurement_id = o.measurement_id
WHERE r.status = 'done';

-- Mean paired effect over seeds, its standard error (NULL with one seed) and the seed count; with converged_only,
-- over the converged seeds only (an effect with none is left out). n_other_model: of those seeds, the ones whose
-- effect is about another model than the predictions' (seed_effects.other_model). first_outcome_at and first_outcome_seq, the
-- earliest outcome of the set's runs, count every run: what was known before a prediction does not depend on it.
CREATE OR REPLACE MACRO effects_of(converged_only) AS TABLE
WITH kept AS (
    SELECT *, CASE WHEN converged OR NOT converged_only THEN effect END AS kept_effect FROM seed_effects
)
SELECT study_hash, set_id, regime, measurement_id,
       avg(kept_effect) AS effect,
       stddev_samp(kept_effect) / sqrt(count(kept_effect)) AS effect_se,
       count(kept_effect) AS n_seeds,
       min(finished_at) AS first_outcome_at,
       min(chain_seq) AS first_outcome_seq,
       count(kept_effect) FILTER (WHERE other_model) AS n_other_model
FROM kept
GROUP BY study_hash, set_id, regime, measurement_id
HAVING count(kept_effect) > 0;

CREATE OR REPLACE VIEW effects AS FROM effects_of(false);

-- Whether a method's predictions are scored against a regime: a method without a parameter scope against the
-- regimes that let every parameter move (all but `frozen`); a method with scope R only against
-- `frozen:scope=R,from=full`, the retraining it predicts to first order (never another scope, nor from=init).
CREATE OR REPLACE MACRO predicts_regime(method_config, regime) AS
    CASE WHEN coalesce(method_config->>'scope', '') = '' THEN regime NOT LIKE 'frozen:%'
         ELSE regime = 'frozen:scope=' || (method_config->>'scope') || ',from=full' END;

-- Every registered prediction beside the effect it predicts, one row per regime it predicts (`predicts_regime`)
-- with outcomes.
-- post_hoc: chained after an outcome for its (set, measurement, regime) was: order in the chain decides, not
-- the clock (rows of an older ledger that no write has chained yet fall back to their timestamps).
CREATE OR REPLACE MACRO prediction_accuracy_of(converged_only) AS TABLE
SELECT st.study, p.study_hash, p.method, p.config_hash, e.regime, s.kind AS set_kind, p.set_id,
       s.size AS set_size, p.measurement_id, p.predicted,
       e.effect AS actual, e.effect_se AS actual_se, e.n_seeds,
       coalesce(pc.seq > e.first_outcome_seq, p.registered_at > e.first_outcome_at) AS post_hoc,
       p.seq, p.registered_at
FROM predictions p
LEFT JOIN chain_positions pc ON pc.entry = 'predictions' AND pc.key = p.prediction_id
JOIN studies st ON st.study_hash = p.study_hash
JOIN removal_sets s ON s.set_id = p.set_id
JOIN effects_of(converged_only) e
  ON e.study_hash = p.study_hash AND e.set_id = p.set_id AND e.measurement_id = p.measurement_id
 AND predicts_regime(p.method_config, e.regime);

CREATE OR REPLACE VIEW prediction_accuracy AS FROM prediction_accuracy_of(false);

-- Reliability of the seed-mean effects per (study, regime, set kind), as an intraclass correlation over the
-- (set, measurement) items that have at least two seeds: with m_i the mean of item i's n_i seed effects and s_i²
-- their sample variance, observed_variance = var(m_i) and error_variance = mean(s_i² / n_i), the variance that
-- seed noise adds to a mean; reliability = 1 − error_variance / observed_variance (the share of the seed means'
-- variance that is not seed noise; unbiased parts for any seed count, unlike a split half of an odd count).
-- The ceiling on any predictor's Pearson with the seed-mean effects is sqrt(reliability): the true effects reach
-- it, and a predictor independent of the seeds' noise cannot exceed it but by sampling error. With converged_only,
-- over converged seeds only.
CREATE OR REPLACE MACRO noise_ceiling_of(converged_only) AS TABLE
WITH items AS (
    SELECT se.study_hash, se.regime, s.kind AS set_kind, se.set_id, se.measurement_id,
           avg(se.effect) AS mean_effect, var_samp(se.effect) / count(*) AS error_variance, count(*) AS n_seeds
    FROM seed_effects se
    JOIN removal_sets s ON s.set_id = se.set_id
    WHERE se.converged OR NOT converged_only
    GROUP BY ALL
    HAVING count(*) >= 2
), r AS (
    SELECT study_hash, regime, set_kind, count(*) AS n_items, avg(n_seeds) AS mean_seeds,
           var_samp(mean_effect) AS observed_variance, avg(error_variance) AS error_variance
    FROM items
    GROUP BY ALL
)
SELECT study_hash, regime, set_kind, n_items, mean_seeds, observed_variance, error_variance,
       1 - error_variance / nullif(observed_variance, 0) AS reliability,
       sqrt(greatest(1 - error_variance / nullif(observed_variance, 0), 0)) AS noise_ceiling
FROM r;

CREATE OR REPLACE VIEW noise_ceiling AS FROM noise_ceiling_of(false);

-- Calibration of each method against each regime's effects; post-hoc predictions only when asked, and only the
-- converged runs' effects with converged_only (n_runs and n_converged count every finished pbrf run either way).
-- Pooled over all (set, measurement) pairs: pearson; spearman (Pearson of average ranks).
-- Per measurement, across removal sets, then averaged over measurements: pearson_by_measurement,
-- spearman_by_measurement (for random sets this is the LDS).
-- sign_agreement: share of same signs among effects beyond noise (|effect| > 2 se, or se unknown),
-- counted in n_sign. slope, intercept: least squares of actual on predicted (1 and 0 when calibrated).
CREATE OR REPLACE MACRO calibration_of(include_post_hoc, converged_only := false) AS TABLE
WITH pa AS (
    SELECT *,
           rank() OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind ORDER BY predicted)
             + (count(*) OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind, predicted) - 1) / 2.0
             AS rank_predicted,
           rank() OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind ORDER BY actual)
             + (count(*) OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind, actual) - 1) / 2.0
             AS rank_actual,
           rank() OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind, measurement_id
                        ORDER BY predicted)
             + (count(*) OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind, measurement_id,
                               predicted) - 1) / 2.0 AS rank_predicted_m,
           rank() OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind, measurement_id
                        ORDER BY actual)
             + (count(*) OVER (PARTITION BY study_hash, method, config_hash, regime, set_kind, measurement_id,
                               actual) - 1) / 2.0 AS rank_actual_m,
           actual_se IS NULL OR abs(actual) > 2 * actual_se AS beyond_noise
    FROM prediction_accuracy_of(converged_only)
    WHERE include_post_hoc OR NOT post_hoc
), by_measurement AS (
    SELECT study_hash, method, config_hash, regime, set_kind, measurement_id,
           corr(predicted, actual) AS pearson_m, corr(rank_predicted_m, rank_actual_m) AS spearman_m
    FROM pa GROUP BY ALL
), averaged AS (
    SELECT study_hash, method, config_hash, regime, set_kind,
           avg(pearson_m) AS pearson_by_measurement, avg(spearman_m) AS spearman_by_measurement
    FROM by_measurement GROUP BY ALL
), convergence AS (
    SELECT r.study_hash, r.regime, s.kind AS set_kind, count(*) AS n_runs,
           count(*) FILTER (WHERE r.converged) AS n_converged
    FROM runs r JOIN removal_sets s USING (set_id)
    WHERE r.status = 'done' AND s.kind <> 'full' AND r.regime = 'pbrf'
    GROUP BY ALL
)
SELECT pa.study, pa.study_hash, pa.method, pa.config_hash, pa.regime, pa.set_kind,
       count(*) AS n,
       corr(predicted, actual) AS pearson,
       corr(rank_predicted, rank_actual) AS spearman,
       any_value(av.pearson_by_measurement) AS pearson_by_measurement,
       any_value(av.spearman_by_measurement) AS spearman_by_measurement,
       avg(CASE WHEN sign(predicted) = sign(actual) THEN 1.0 ELSE 0.0 END) FILTER (WHERE beyond_noise)
         AS sign_agreement,
       count(*) FILTER (WHERE beyond_noise) AS n_sign,
       regr_slope(actual, predicted) AS slope,
       regr_intercept(actual, predicted) AS intercept,
       avg(n_seeds) AS mean_seeds,
       any_value(nc.noise_ceiling) AS noise_ceiling,
       any_value(cv.n_runs) AS n_runs,
       any_value(cv.n_converged) AS n_converged
FROM pa
LEFT JOIN noise_ceiling_of(converged_only) nc USING (study_hash, regime, set_kind)
LEFT JOIN convergence cv USING (study_hash, regime, set_kind)
LEFT JOIN averaged av USING (study_hash, method, config_hash, regime, set_kind)
GROUP BY pa.study, pa.study_hash, pa.method, pa.config_hash, pa.regime, pa.set_kind;

-- Bootstrap 95% intervals (resampling removal sets and measurements), written by `ifledger calibrate`; they apply while the
-- calibration they were computed from still has the same n (otherwise they read NULL until recomputed).
CREATE TABLE IF NOT EXISTS calibration_intervals (
    study_hash       VARCHAR NOT NULL,
    method           VARCHAR NOT NULL,
    config_hash      VARCHAR NOT NULL,
    regime           VARCHAR NOT NULL,
    set_kind         VARCHAR NOT NULL,
    include_post_hoc BOOLEAN NOT NULL,
    converged_only   BOOLEAN NOT NULL DEFAULT false,
    n                BIGINT NOT NULL,
    replicates       INTEGER NOT NULL,
    pearson_lo DOUBLE, pearson_hi DOUBLE,
    spearman_lo DOUBLE, spearman_hi DOUBLE,
    slope_lo DOUBLE, slope_hi DOUBLE,
    lds_lo DOUBLE, lds_hi DOUBLE,
    computed_at      TIMESTAMP NOT NULL,
    nonfinite_replicates INTEGER,  -- the most replicates any metric had non-finite (left out of its interval)
    PRIMARY KEY (study_hash, method, config_hash, regime, set_kind, include_post_hoc, converged_only)
);
-- ledgers written before non-finite replicates were counted (idempotent)
ALTER TABLE calibration_intervals ADD COLUMN IF NOT EXISTS nonfinite_replicates INTEGER;

-- The calibration table users read: point estimates, their intervals, and the LDS for random sets
-- (lds = spearman_by_measurement over random subsets).
CREATE OR REPLACE MACRO calibration_with_intervals(include_post_hoc, converged_only := false) AS TABLE
SELECT c.study, c.study_hash, c.method, c.config_hash, c.regime, c.set_kind, c.n,
       c.pearson, ci.pearson_lo, ci.pearson_hi,
       c.spearman, ci.spearman_lo, ci.spearman_hi,
       c.pearson_by_measurement, c.spearman_by_measurement,
       CASE WHEN c.set_kind = 'random' THEN c.spearman_by_measurement END AS lds,
       CASE WHEN c.set_kind = 'random' THEN ci.lds_lo END AS lds_lo,
       CASE WHEN c.set_kind = 'random' THEN ci.lds_hi END AS lds_hi,
       c.sign_agreement, c.n_sign, c.slope, ci.slope_lo, ci.slope_hi, c.intercept, c.mean_seeds, c.noise_ceiling,
       c.n_runs, c.n_converged, ci.replicates, ci.nonfinite_replicates
FROM calibration_of(include_post_hoc, converged_only := converged_only) c
LEFT JOIN calibration_intervals ci
  ON ci.study_hash = c.study_hash AND ci.method = c.method AND ci.config_hash = c.config_hash
 AND ci.regime = c.regime AND ci.set_kind = c.set_kind AND ci.include_post_hoc = include_post_hoc
 AND ci.converged_only = converged_only AND ci.n = c.n
ORDER BY c.study, c.regime, c.set_kind, c.method;

CREATE OR REPLACE VIEW calibration AS FROM calibration_with_intervals(false);


-- What removing top_k sets did, beside random sets as the baseline: per study, regime, ranking method and k,
-- the mean effect on the measurement each set was ranked against, signed so that the predicted direction is
-- positive (`moved`); rows with ranked_by = 'random' hold the mean |effect| of random sets of that size over all
-- measurements (a generous baseline): the `top_k_baseline` sets registered with the top_k sets, and any `random`
-- sets of that size. With converged_only, of the effects of converged runs.
CREATE OR REPLACE MACRO top_k_effects_of(converged_only) AS TABLE
SELECT st.study, e.study_hash, e.regime, s.ranked_by, s.size AS k,
       avg(CASE WHEN s.direction = 'positive' THEN e.effect ELSE -e.effect END) AS moved,
       count(DISTINCT s.set_id) AS sets
FROM effects_of(converged_only) e JOIN removal_sets s USING (set_id) JOIN studies st ON st.study_hash = e.study_hash
WHERE s.kind = 'top_k' AND e.measurement_id = s.target
GROUP BY ALL
UNION ALL
SELECT st.study, e.study_hash, e.regime, 'random', s.size, avg(abs(e.effect)), count(DISTINCT s.set_id)
FROM effects_of(converged_only) e JOIN removal_sets s USING (set_id) JOIN studies st ON st.study_hash = e.study_hash
WHERE s.kind IN ('random', 'top_k_baseline')
GROUP BY ALL;

CREATE OR REPLACE VIEW top_k_effects AS FROM top_k_effects_of(false);

-- Brittleness of top_k removals (Ilyas et al.): for measurements that are decision margins (ids containing
-- 'margin'; positive = the model decides correctly) that are positive on the full data, the share whose
-- margin turns negative when the set ranked against them is removed: predicted (full + predicted effect) vs
-- observed (full + actual effect), per method, regime and k. With converged_only, of the effects of converged runs.
CREATE OR REPLACE MACRO brittleness_of(converged_only) AS TABLE
WITH base AS (
    SELECT r.study_hash, r.regime, o.measurement_id, avg(o.value) AS full_value
    FROM runs r
    JOIN removal_sets s ON s.set_id = r.set_id AND s.kind = 'full'
    JOIN outcomes o ON o.run_id = r.run_id
    WHERE r.status = 'done'
    GROUP BY ALL
)
SELECT pa.study, pa.study_hash, pa.method, s.ranked_by, pa.regime, s.size AS k,
       count(*) AS n,
       avg(CASE WHEN b.full_value + pa.predicted < 0 THEN 1.0 ELSE 0.0 END) AS predicted_flip_rate,
       avg(CASE WHEN b.full_value + pa.actual < 0 THEN 1.0 ELSE 0.0 END) AS observed_flip_rate,
       avg(CASE WHEN (b.full_value + pa.predicted < 0) = (b.full_value + pa.actual < 0) THEN 1.0 ELSE 0.0 END)
         AS agreement
FROM prediction_accuracy_of(converged_only) pa
JOIN removal_sets s ON s.set_id = pa.set_id
JOIN base b ON b.study_hash = pa.study_hash AND b.regime = pa.regime AND b.measurement_id = pa.measurement_id
WHERE s.kind = 'top_k' AND NOT pa.post_hoc AND pa.measurement_id = s.target
  AND pa.measurement_id LIKE '%margin%' AND b.full_value > 0
GROUP BY ALL
ORDER BY pa.study, pa.regime, pa.method, k;

CREATE OR REPLACE VIEW brittleness AS FROM brittleness_of(false);

-- Mislabel detection. flipped_labels: the training points whose given label is known to be wrong (a study's
-- `true_labels()`, e.g. digits-mislabel's seeded flips); the estimators never read it. self_influence: one score per
-- (study, detection method, config, seed, training point), larger = more suspect, written by `ifledger detect`.
CREATE TABLE IF NOT EXISTS flipped_labels (
    study_hash  VARCHAR NOT NULL,
    train_index INTEGER NOT NULL,
    given_label INTEGER NOT NULL,
    true_label  INTEGER NOT NULL,
    PRIMARY KEY (study_hash, train_index)
);

CREATE TABLE IF NOT EXISTS self_influence (
    study_hash    VARCHAR NOT NULL,
    method        VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    method_config JSON NOT NULL,
    seed          INTEGER NOT NULL,
    train_index   INTEGER NOT NULL,
    score         DOUBLE NOT NULL,
    code_version  VARCHAR NOT NULL,
    registered_at TIMESTAMP NOT NULL,
    PRIMARY KEY (study_hash, method, config_hash, seed, train_index)
);

-- Per seed: the recall of flipped points among the top ceil(p N) scored points (ties broken by index), for p in
-- 5/10/20/30%, and the AUC (Mann-Whitney: the chance that a flipped point outscores a clean one, ties count half).
-- Only studies with flipped labels.
CREATE OR REPLACE VIEW detection_by_seed AS
WITH scored AS (
    SELECT si.study_hash, si.method, si.config_hash, si.seed, f.train_index IS NOT NULL AS flipped,
           row_number() OVER (PARTITION BY si.study_hash, si.method, si.config_hash, si.seed
                              ORDER BY si.score DESC, si.train_index) AS position,
           rank() OVER (PARTITION BY si.study_hash, si.method, si.config_hash, si.seed ORDER BY si.score)
             + (count(*) OVER (PARTITION BY si.study_hash, si.method, si.config_hash, si.seed, si.score) - 1) / 2.0
             AS ascending_rank,
           count(*) OVER (PARTITION BY si.study_hash, si.method, si.config_hash, si.seed) AS n
    FROM self_influence si
    LEFT JOIN flipped_labels f ON f.study_hash = si.study_hash AND f.train_index = si.train_index
    WHERE si.study_hash IN (SELECT study_hash FROM flipped_labels)
), auc AS (
    SELECT study_hash, method, config_hash, seed, any_value(n) AS n, count(*) FILTER (WHERE flipped) AS n_flipped,
           (sum(ascending_rank) FILTER (WHERE flipped)
             - count(*) FILTER (WHERE flipped) * (count(*) FILTER (WHERE flipped) + 1) / 2.0)
             / (count(*) FILTER (WHERE flipped) * (any_value(n) - count(*) FILTER (WHERE flipped))) AS auc
    FROM scored GROUP BY ALL
)
SELECT h.study_hash, h.method, h.config_hash, h.seed, h.inspected_fraction, a.n AS n_train, a.n_flipped,
       h.hits / a.n_flipped AS recall, a.auc
FROM (SELECT s.study_hash, s.method, s.config_hash, s.seed, fr.inspected_fraction,
             count(*) FILTER (WHERE s.flipped AND s.position <= ceil(fr.inspected_fraction * s.n)) AS hits
      FROM scored s CROSS JOIN (SELECT unnest([0.05, 0.1, 0.2, 0.3]::DOUBLE[]) AS inspected_fraction) fr
      GROUP BY ALL) h
JOIN auc a USING (study_hash, method, config_hash, seed);

-- 97.5% quantile of Student's t with df degrees of freedom (exact to 3 decimals for df <= 10, within 0.003 above).
CREATE OR REPLACE MACRO t975(df) AS
    CASE WHEN df < 1 THEN NULL
         ELSE coalesce([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228][df],
                       1.96 + 2.4 / df + 3.0 / (df * df)) END;

-- Detection per study, method and inspected fraction: mean recall and AUC over seeds with 95% t intervals (NULL with
-- one seed), clipped to [0, 1]; versus_loss compares recall with the training-loss baseline of the same study and
-- fraction: 'better' or 'worse' only when the intervals do not overlap, else 'not distinguishable'.
CREATE OR REPLACE VIEW detection AS
WITH m AS (
    SELECT st.study, d.study_hash, d.method, d.config_hash, d.inspected_fraction,
           avg(d.recall) AS recall, t975(count(*) - 1) * stddev_samp(d.recall) / sqrt(count(*)) AS recall_half,
           avg(d.auc) AS auc, t975(count(*) - 1) * stddev_samp(d.auc) / sqrt(count(*)) AS auc_half,
           count(*) AS n_seeds, any_value(d.n_flipped) AS n_flipped, any_value(d.n_train) AS n_train
    FROM detection_by_seed d JOIN studies st ON st.study_hash = d.study_hash
    GROUP BY ALL
), ci AS (
    SELECT *, greatest(recall - recall_half, 0) AS recall_lo, least(recall + recall_half, 1) AS recall_hi,
           greatest(auc - auc_half, 0) AS auc_lo, least(auc + auc_half, 1) AS auc_hi
    FROM m
)
SELECT c.study, c.study_hash, c.method, c.config_hash, c.inspected_fraction, c.recall, c.recall_lo, c.recall_hi,
       c.auc, c.auc_lo, c.auc_hi, c.n_seeds, c.n_flipped, c.n_train,
       CASE WHEN c.method = 'loss' OR b.recall IS NULL THEN NULL
            WHEN c.recall_lo > b.recall_hi THEN 'better'
            WHEN c.recall_hi < b.recall_lo THEN 'worse'
            ELSE 'not distinguishable' END AS versus_loss
FROM ci c
LEFT JOIN ci b ON b.study_hash = c.study_hash AND b.method = 'loss' AND b.inspected_fraction = c.inspected_fraction
ORDER BY c.study, c.inspected_fraction, c.recall DESC;

-- Two-sided p-value of Student's t with df degrees of freedom, P(|T| > |t|) (Abramowitz & Stegun 26.7.3-4, exact for
-- integer df >= 1): with θ = atan(|t| / sqrt(df)), P(|T| <= |t|) = 2θ/π + (2/π) sin θ Σ_{k<(df-1)/2} e_k cos^{2k+1} θ
-- for odd df, sin θ Σ_{k<df/2} d_k cos^{2k} θ for even df (e_k = Π_{i<=k} 2i/(2i+1), d_k = Π_{i<=k} (2i-1)/(2i)).
CREATE OR REPLACE MACRO t_two_sided_p(t, df) AS
    CASE WHEN df < 1 OR t IS NULL OR isnan(t) THEN NULL
         WHEN df % 2 = 1 THEN 1 - 2 / pi() * (atan(abs(t) / sqrt(df)) + sin(atan(abs(t) / sqrt(df)))
             * coalesce(list_sum(list_transform(range(((df - 1) // 2)::BIGINT), lambda k:
                 exp(lgamma(k + 1) + lgamma(1.5) - lgamma(k + 1.5)) * cos(atan(abs(t) / sqrt(df))) ** (2 * k + 1))),
               0))
         ELSE 1 - sin(atan(abs(t) / sqrt(df))) * list_sum(list_transform(range((df // 2)::BIGINT), lambda k:
                 exp(lgamma(k + 0.5) - lgamma(0.5) - lgamma(k + 1)) * cos(atan(abs(t) / sqrt(df))) ** (2 * k)))
    END;

-- 95% quantile of Student's t with df degrees of freedom (exact to 3 decimals for df <= 10, Cornish-Fisher's
-- 1.645 + 1.524/df + 1.42/df² above, within 0.002): the bound of a one-sided test at 5%, of a 90% interval.
CREATE OR REPLACE MACRO t95(df) AS
    CASE WHEN df < 1 THEN NULL
         ELSE coalesce([6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812][df],
                       1.645 + 1.524 / df + 1.42 / (df * df)) END;

-- The reversal test (Grosse et al. 2023; Berglund et al. 2023), for studies whose measurements carry the facets
-- statistic, direction ('forward' | 'reverse'), template, group and entity (`Study.measurement_tags`, as `reversal`
-- declares them) and whose removal sets include `group:entity=<entity>` sets. reversal_facets: those facets of each
-- per-entity measurement. reversal_seed_ratios, per seed: the actual ratio of removing
-- an entity's sentences: ratio = reverse effect / forward effect on the entity's own measurements of one statistic
-- (positive: the reverse moves the way the forward does; NULL when the forward effect is 0).
CREATE OR REPLACE VIEW reversal_facets AS
SELECT study_hash, measurement_id, tags->>'statistic' AS statistic, tags->>'direction' AS direction,
       tags->>'template' AS template, tags->>'group' AS entity_group, tags->>'entity' AS entity
FROM measurements
WHERE tags->>'entity' IS NOT NULL AND tags->>'direction' IN ('forward', 'reverse');

CREATE OR REPLACE VIEW reversal_seed_ratios AS
WITH paired AS (
    SELECT e.study_hash, e.regime, f.statistic, f.template, f.entity_group, f.entity, e.set_id, e.seed,
           any_value(e.effect) FILTER (WHERE f.direction = 'forward') AS forward_effect,
           any_value(e.effect) FILTER (WHERE f.direction = 'reverse') AS reverse_effect
    FROM seed_effects e
    JOIN reversal_facets f ON f.study_hash = e.study_hash AND f.measurement_id = e.measurement_id
    JOIN removal_sets s ON s.set_id = e.set_id AND s.kind = 'group' AND s.label = 'group:entity=' || f.entity
    GROUP BY ALL
    HAVING count(DISTINCT f.direction) = 2
)
SELECT *, reverse_effect / nullif(forward_effect, 0) AS ratio FROM paired;

-- Both granularities of the test at once (so each statistic is defined once): one row per (study, method, config,
-- regime, statistic, template, group, entity) with registered, not post-hoc predictions of both directions of the
-- entity's own measurements under its own removal set, and one pooled row (entity NULL) per group over its entities.
-- Per entity, over its paired seeds: signed_ratio = rho = mean reverse effect / mean forward effect (a ratio of
--   means: a seed whose forward effect is near 0 does not blow it up, as it would a mean of per-seed ratios),
--   signed_lo/hi its 90% Fieller interval {rho0 : the paired t test of E[reverse - rho0 × forward] = 0 does not
--   reject at 10%} (df = pairs - 1; NULL when unbounded, i.e. the forward effect is not shown to differ from 0);
--   actual_ratio = |rho|, ratio_lo/hi that interval folded: ratio_hi < 0.1 is exactly the two one-sided tests at 5%
--   of |E reverse| < 0.1 × |E forward|, ratio_lo > 0.1 shows the reverse moving by more than a tenth (either sign);
--   predicted_ratio = |predicted reverse| / |predicted forward|; forward/reverse_effect = mean paired effect, lo/hi
--   its 95% t interval.
-- Pooled, over the entities (each entity's seeds first: a mean of per-seed |ratio| over (seed, entity) pairs would
-- measure seed noise, E|noise|, which no number of seeds shrinks): actual_ratio = mean over entities of |rho|,
--   ratio_hi its 90% t bound over entities (df = entities - 1; E|rho hat| >= |rho| up to the ratio's O(1/seeds)
--   bias), ratio_lo the 90% t bound over entities of |rho| - se(rho) (se by the delta method: E|noise| <= se for any
--   noise, by Cauchy-Schwarz), >= 0; reverse effects of opposite signs do not cancel in it (they do in
--   signed_ratio, the mean of rho over entities, signed_lo/hi its 90% t interval over entities); predicted_ratio
--   and the effects: means over entities, with their t intervals over entities. A pool of one entity is that
--   entity's row. benchmarks/reversal_equivalence.py measures the error rates (RESULTS.md).
-- The registered prediction: predicted_ratio <= 0.1 says the reverse does not move, a larger one that it does.
-- Decided by the intervals only: ratio_hi < 0.1 shows the reverse under a tenth of the forward (held iff predicted
-- <= 0.1); ratio_lo > 0.1 shows it moving by more (held iff predicted > 0.1); else nothing is decided. A
-- forward-only row counts only when its positive control, the pooled Both row of the same (study, method, config,
-- regime, statistic, template), shows its reverse moving with the forward (control_signed_lo > 0.1).
CREATE OR REPLACE VIEW reversal_ratios AS
WITH predicted AS (
    SELECT pa.study, pa.study_hash, pa.method, pa.config_hash, pa.regime, f.statistic, f.template, f.entity_group,
           f.entity,
           any_value(pa.predicted) FILTER (WHERE f.direction = 'forward') AS predicted_forward,
           any_value(pa.predicted) FILTER (WHERE f.direction = 'reverse') AS predicted_reverse
    FROM prediction_accuracy pa
    JOIN reversal_facets f ON f.study_hash = pa.study_hash AND f.measurement_id = pa.measurement_id
    JOIN removal_sets s ON s.set_id = pa.set_id AND s.kind = 'group' AND s.label = 'group:entity=' || f.entity
    WHERE NOT pa.post_hoc
    GROUP BY ALL
    HAVING count(DISTINCT f.direction) = 2
), entities AS (
    SELECT p.study, p.study_hash, p.method, p.config_hash, p.regime, p.statistic, p.template, p.entity_group,
           p.entity, any_value(p.predicted_forward) AS predicted_forward,
           any_value(p.predicted_reverse) AS predicted_reverse,
           any_value(abs(p.predicted_reverse) / nullif(abs(p.predicted_forward), 0)) AS predicted_ratio,
           avg(r.forward_effect) AS forward_effect,
           t975(count(*) - 1) * stddev_samp(r.forward_effect) / sqrt(count(*)) AS forward_half,
           avg(r.reverse_effect) AS reverse_effect,
           t975(count(*) - 1) * stddev_samp(r.reverse_effect) / sqrt(count(*)) AS reverse_half,
           var_samp(r.forward_effect) / count(*) AS vff, var_samp(r.reverse_effect) / count(*) AS vrr,
           covar_samp(r.reverse_effect, r.forward_effect) / count(*) AS vrf, t95(count(*) - 1) ** 2 AS tt,
           count(DISTINCT r.seed) AS n_seeds, count(*) AS n_pairs
    FROM predicted p
    JOIN reversal_seed_ratios r USING (study_hash, regime, statistic, template, entity_group, entity)
    GROUP BY ALL
), fieller AS (
    SELECT *, reverse_effect / nullif(forward_effect, 0) AS signed_ratio,
           forward_effect ** 2 - tt * vff AS qa, reverse_effect * forward_effect - tt * vrf AS qb,
           reverse_effect ** 2 - tt * vrr AS qc,
           vrr - 2 * signed_ratio * vrf + signed_ratio ** 2 * vff AS mean_difference_variance
    FROM entities
), folded AS (
    SELECT *, CASE WHEN qa > 0 THEN (qb - sqrt(greatest(qb * qb - qa * qc, 0))) / qa END AS signed_lo,
           CASE WHEN qa > 0 THEN (qb + sqrt(greatest(qb * qb - qa * qc, 0))) / qa END AS signed_hi,
           abs(signed_ratio) AS actual_ratio,
           actual_ratio - sqrt(CASE WHEN mean_difference_variance < 0 THEN 0 ELSE mean_difference_variance END)
               / abs(forward_effect) AS magnitude_floor
    FROM fieller
), entity_rows AS (
    SELECT *, CASE WHEN signed_lo > 0 THEN signed_lo WHEN signed_hi < 0 THEN -signed_hi
                   WHEN signed_lo IS NOT NULL THEN 0 END AS ratio_lo,
           greatest(abs(signed_lo), abs(signed_hi)) AS ratio_hi,
           count(*) OVER (PARTITION BY study_hash, method, config_hash, regime, statistic, template, entity_group)
               AS k
    FROM folded
), pooled AS (
    SELECT study, study_hash, method, config_hash, regime, statistic, template, entity_group,
           NULL::VARCHAR AS entity,
           avg(predicted_forward) AS predicted_forward, avg(predicted_reverse) AS predicted_reverse,
           avg(predicted_ratio) AS predicted_ratio,
           avg(forward_effect) AS forward_effect, t975(count(*) - 1) * stddev_samp(forward_effect) / sqrt(count(*))
               AS forward_half,
           avg(reverse_effect) AS reverse_effect, t975(count(*) - 1) * stddev_samp(reverse_effect) / sqrt(count(*))
               AS reverse_half,
           avg(signed_ratio) AS signed_ratio,
           t95(count(signed_ratio) - 1) * stddev_samp(signed_ratio) / sqrt(count(signed_ratio)) AS signed_half,
           avg(actual_ratio) AS actual_ratio,
           t95(count(actual_ratio) - 1) * stddev_samp(actual_ratio) / sqrt(count(actual_ratio)) AS ratio_half,
           avg(magnitude_floor) - t95(count(magnitude_floor) - 1) * stddev_samp(magnitude_floor)
               / sqrt(count(magnitude_floor)) AS floor_lo,
           min(n_seeds) AS n_seeds, count(DISTINCT entity) AS n_entities, sum(n_pairs) AS n_pairs
    FROM entity_rows
    WHERE k > 1
    GROUP BY ALL
), all_rows AS (  -- every entity's row; as its group's pooled row too when it is the group's only entity
    SELECT study, study_hash, method, config_hash, regime, statistic, template, entity_group,
           CASE WHEN NOT pooled THEN entity END AS entity, pooled,
           predicted_forward, predicted_reverse, predicted_ratio, forward_effect, forward_half, reverse_effect,
           reverse_half, actual_ratio, ratio_lo, ratio_hi, signed_ratio, signed_lo, signed_hi, n_seeds,
           1 AS n_entities, n_pairs
    FROM entity_rows, (SELECT unnest([false, true]) AS pooled)
    WHERE NOT pooled OR k = 1
    UNION ALL BY NAME
    SELECT study, study_hash, method, config_hash, regime, statistic, template, entity_group, entity, true AS pooled,
           predicted_forward, predicted_reverse, predicted_ratio, forward_effect, forward_half, reverse_effect,
           reverse_half, actual_ratio, CASE WHEN floor_lo < 0 THEN 0 ELSE floor_lo END AS ratio_lo,
           actual_ratio + ratio_half AS ratio_hi, signed_ratio, signed_ratio - signed_half AS signed_lo,
           signed_ratio + signed_half AS signed_hi, n_seeds, n_entities, n_pairs
    FROM pooled
), controlled AS (
    SELECT *, any_value(signed_lo) FILTER (WHERE pooled AND entity_group = 'Both')
               OVER (PARTITION BY study_hash, method, config_hash, regime, statistic, template) AS control_signed_lo
    FROM all_rows
), judged AS (
    SELECT *,
           CASE WHEN n_seeds < 2 THEN 'one seed: no noise estimate'
                WHEN predicted_ratio IS NULL THEN 'no prediction: predicted forward effect is 0'
                WHEN entity_group <> 'Both' AND control_signed_lo IS NULL THEN 'no power: no Both-directions control'
                WHEN entity_group <> 'Both' AND control_signed_lo <= 0.1
                    THEN 'no power: the Both control''s reverse is not shown to move'
                WHEN ratio_hi < 0.1 THEN CASE WHEN predicted_ratio <= 0.1 THEN 'held' ELSE 'refuted' END
                WHEN ratio_lo > 0.1 THEN CASE WHEN predicted_ratio > 0.1 THEN 'held' ELSE 'refuted' END
                ELSE 'undecided: neither |ratio| < 0.1 nor a movement beyond ±0.1 is shown' END AS verdict
    FROM controlled
)
SELECT study, study_hash, method, config_hash, regime, statistic, template, entity_group, entity, pooled,
       predicted_forward, predicted_reverse, predicted_ratio,
       forward_effect, forward_effect - forward_half AS forward_lo, forward_effect + forward_half AS forward_hi,
       reverse_effect, reverse_effect - reverse_half AS reverse_lo, reverse_effect + reverse_half AS reverse_hi,
       actual_ratio, ratio_lo, ratio_hi, signed_ratio, signed_lo, signed_hi, n_seeds, n_entities, n_pairs,
       control_signed_lo,
       CASE verdict WHEN 'held' THEN true WHEN 'refuted' THEN false END AS held, verdict
FROM judged;

-- Per entity: the rows of reversal_ratios for one entity each. (One column per EXCLUDE: DuckDB writes a list of them
-- back in any order, and the audit compares the definitions.)
CREATE OR REPLACE VIEW reversal_test AS
SELECT * EXCLUDE (n_entities) FROM (SELECT * EXCLUDE (pooled) FROM reversal_ratios WHERE NOT pooled)
ORDER BY study, regime, method, statistic, template, entity_group DESC, entity;

-- Pooled: one row per (study, method, config, regime, statistic, template, group) over the group's entities, the
-- verdict of the registered prediction on the forward-only group (its Both row is the positive control).
CREATE OR REPLACE VIEW reversal_verdict AS
SELECT * EXCLUDE (entity) FROM (SELECT * EXCLUDE (pooled) FROM reversal_ratios WHERE pooled)
ORDER BY study, regime, method, statistic, template, entity_group DESC;

-- Where a dataset change lands (predictions/weight_change.py). predicted_weight_changes: a method's first-order
-- weight change of one parameter block B for one (set, seed model), Δθ̂_S,B = ((1/N) A⁻¹ Σ_{j∈S} ∇L_j)_B (a relabelled
-- point: its removal, then the addition of its new label), registered and chained like predictions; norm = ‖Δθ̂_B‖
-- and direction = the block's vector (blocks up to 2,048 parameters) or its count sketch (larger blocks: each
-- coordinate added with a seeded sign into one of 2,048 seeded buckets, the same for every vector of the block, so
-- that a dot product of two sketches estimates the vectors' one). run_weight_changes: where a run ended, θ_run,B −
-- θ*_B from the same seed's full-data model θ*, stored the same way (chained with its run), measured for the runs of
-- sets that have predicted weight changes, their baselines, and every full-data model.
CREATE TABLE IF NOT EXISTS predicted_weight_changes (
    weight_change_id VARCHAR PRIMARY KEY,
    study_hash    VARCHAR NOT NULL,
    method        VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    method_config JSON NOT NULL,
    set_id        VARCHAR NOT NULL,
    seed          INTEGER NOT NULL,
    block         VARCHAR NOT NULL,
    norm          DOUBLE NOT NULL,
    direction     DOUBLE[] NOT NULL,
    code_version  VARCHAR NOT NULL,
    registered_at TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS run_weight_changes (
    run_id    VARCHAR NOT NULL,
    block     VARCHAR NOT NULL,
    norm      DOUBLE NOT NULL,
    direction DOUBLE[] NOT NULL,
    PRIMARY KEY (run_id, block)
);

-- Predicted against actual weight change per (method, regime, set, seed, block), for the regimes each method
-- predicts (`predicts_regime`); block '(all)' is the whole parameter vector. The actual change is paired like an
-- effect: Δθ_B = (θ_run − θ*)_B − (θ_baseline − θ*)_B, the baseline the `full` run of the same seed and regime
-- (θ* itself for scratch and pbrf; warm's and frozen's baselines keep training on the full data, and that drift is
-- not the set's). cosine = Δθ̂_B·Δθ_B / (‖Δθ̂_B‖ ‖Δθ_B‖), actual_norm = ‖Δθ_B‖: exact for blocks of up to 2,048
-- parameters, estimated from the sketches above (about 2%). post_hoc: chained after a finished run of its (set,
-- regime), as for predictions.
CREATE OR REPLACE VIEW weight_change_by_seed AS
WITH moved AS (
    SELECT r.study_hash, r.set_id, r.seed, r.regime, w.block, w.direction, c.seq AS run_seq
    FROM runs r
    JOIN run_weight_changes w USING (run_id)
    LEFT JOIN chain_positions c ON c.entry = 'runs' AND c.key = r.run_id
    WHERE r.status = 'done'
), actual AS (
    SELECT m.study_hash, m.set_id, m.seed, m.regime, m.block,
           list_transform(m.direction, lambda v, i: v - b.direction[i]) AS direction,
           min(m.run_seq) OVER (PARTITION BY m.study_hash, m.set_id, m.regime) AS first_run_seq
    FROM moved m
    JOIN removal_sets fs ON fs.study_hash = m.study_hash AND fs.kind = 'full'
    JOIN moved b ON b.set_id = fs.set_id AND b.seed = m.seed AND b.regime = m.regime AND b.block = m.block
    WHERE m.set_id <> fs.set_id
), blocks AS (
    SELECT p.study_hash, p.method, p.config_hash, a.regime, p.set_id, p.seed, p.block,
           p.norm AS predicted_norm, sqrt(list_dot_product(a.direction, a.direction)) AS actual_norm,
           list_dot_product(p.direction, a.direction) AS dot,
           coalesce(pc.seq > a.first_run_seq, false) AS post_hoc
    FROM predicted_weight_changes p
    LEFT JOIN chain_positions pc ON pc.entry = 'predicted_weight_changes' AND pc.key = p.weight_change_id
    JOIN actual a ON a.study_hash = p.study_hash AND a.set_id = p.set_id AND a.seed = p.seed AND a.block = p.block
    WHERE predicts_regime(p.method_config, a.regime)
), whole AS (
    SELECT study_hash, method, config_hash, regime, set_id, seed, '(all)' AS block,
           sqrt(sum(predicted_norm ** 2)) AS predicted_norm, sqrt(sum(actual_norm ** 2)) AS actual_norm,
           sum(dot) AS dot, bool_or(post_hoc) AS post_hoc
    FROM blocks GROUP BY ALL
)
SELECT st.study, b.study_hash, b.method, b.config_hash, b.regime, b.set_id, s.kind AS set_kind, b.seed, b.block,
       b.predicted_norm, b.actual_norm, b.dot / nullif(b.predicted_norm * b.actual_norm, 0) AS cosine, b.post_hoc
FROM (FROM blocks UNION ALL BY NAME FROM whole) b
JOIN studies st ON st.study_hash = b.study_hash
JOIN removal_sets s ON s.set_id = b.set_id;

-- Per (study, method, regime, set, block): the mean over seeds of the predicted norm, the actual norm and their
-- cosine, each with a 95% t interval over seeds (NULL with one seed), and "which weights move": per set and seed,
-- the Spearman correlation of predicted and actual norms across the blocks (the '(all)' row and blocks that neither
-- moved nor were predicted to, e.g. outside a frozen scope, left out; Pearson of average ranks), averaged over seeds
-- with its interval (the same on every block row of the set). Registered, not post-hoc predictions only.
CREATE OR REPLACE VIEW weight_change AS
WITH kept AS (
    FROM weight_change_by_seed WHERE NOT post_hoc
), ranked AS (
    SELECT *,
           rank() OVER (PARTITION BY study_hash, method, config_hash, regime, set_id, seed ORDER BY predicted_norm)
             + (count(*) OVER (PARTITION BY study_hash, method, config_hash, regime, set_id, seed, predicted_norm)
                - 1) / 2.0 AS rank_predicted,
           rank() OVER (PARTITION BY study_hash, method, config_hash, regime, set_id, seed ORDER BY actual_norm)
             + (count(*) OVER (PARTITION BY study_hash, method, config_hash, regime, set_id, seed, actual_norm)
                - 1) / 2.0 AS rank_actual
    FROM kept WHERE block <> '(all)' AND (predicted_norm > 0 OR actual_norm > 0)
), spearman_by_seed AS (
    SELECT study_hash, method, config_hash, regime, set_id, seed,
           CASE WHEN count(*) >= 2 THEN corr(rank_predicted, rank_actual) END AS spearman
    FROM ranked GROUP BY ALL
), spearman AS (
    SELECT study_hash, method, config_hash, regime, set_id, avg(spearman) AS norm_spearman,
           t975(count(spearman) - 1) * stddev_samp(spearman) / sqrt(count(spearman)) AS half
    FROM spearman_by_seed GROUP BY ALL
), blocks AS (
    SELECT study, study_hash, method, config_hash, regime, set_id, set_kind, block, count(*) AS n_seeds,
           avg(predicted_norm) AS predicted_norm,
           t975(count(*) - 1) * stddev_samp(predicted_norm) / sqrt(count(*)) AS predicted_half,
           avg(actual_norm) AS actual_norm,
           t975(count(*) - 1) * stddev_samp(actual_norm) / sqrt(count(*)) AS actual_half,
           avg(cosine) AS cosine, t975(count(cosine) - 1) * stddev_samp(cosine) / sqrt(count(cosine)) AS cosine_half
    FROM kept GROUP BY ALL
)
SELECT b.study, b.study_hash, b.method, b.config_hash, b.regime, b.set_id, b.set_kind, b.block, b.n_seeds,
       b.predicted_norm, b.predicted_norm - b.predicted_half AS predicted_norm_lo,
       b.predicted_norm + b.predicted_half AS predicted_norm_hi,
       b.actual_norm, b.actual_norm - b.actual_half AS actual_norm_lo, b.actual_norm + b.actual_half AS actual_norm_hi,
       b.cosine, b.cosine - b.cosine_half AS cosine_lo, b.cosine + b.cosine_half AS cosine_hi,
       s.norm_spearman, s.norm_spearman - s.half AS norm_spearman_lo, s.norm_spearman + s.half AS norm_spearman_hi
FROM blocks b
LEFT JOIN spearman s USING (study_hash, method, config_hash, regime, set_id)
ORDER BY b.study, b.regime, b.method, b.set_id, b.block;

-- Per (study, method, regime, block), over the sets of `weight_change` (each set's means over seeds): the cosine's
-- quartiles, the mean norms, and the mean of the sets' norm_spearman with its 95% t interval over sets (the sets
-- are the units here; their own intervals over seeds are not averaged, which would not be an interval of the mean).
CREATE OR REPLACE VIEW weight_change_summary AS
WITH s AS (
    SELECT study, study_hash, method, config_hash, regime, block, count(*) AS sets,
           quantile_cont(cosine, 0.25) AS cosine_q1, median(cosine) AS cosine_median,
           quantile_cont(cosine, 0.75) AS cosine_q3,
           avg(predicted_norm) AS mean_predicted_norm, avg(actual_norm) AS mean_actual_norm,
           avg(norm_spearman) AS norm_spearman,
           t975(count(norm_spearman) - 1) * stddev_samp(norm_spearman) / sqrt(count(norm_spearman)) AS half
    FROM weight_change GROUP BY ALL
)
SELECT study, study_hash, method, config_hash, regime, block, sets, cosine_q1, cosine_median, cosine_q3,
       mean_predicted_norm, mean_actual_norm, norm_spearman, norm_spearman - half AS norm_spearman_lo,
       norm_spearman + half AS norm_spearman_hi
FROM s ORDER BY study, method, regime, block <> '(all)', block;
