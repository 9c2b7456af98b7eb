"""The bad-input catalogue as data: one line per case (``test_bad_inputs.py`` runs them).

CLI cases: (id, command line, fragments the one error line must contain[, working directory]).
Every CLI case must exit with code 2, print exactly one line (``error: ...``) and leave every
file of the workspace as it was.
The command line is split like a shell would; ``{base}`` expands to a small ``train`` on the
tiny policy, and the other placeholders name paths of the test's workspace:

    {model}    a tiny Hugging Face model directory        {run}      a finished 2-step run
    {ckpt}     {run}/checkpoints/step_000002              {new}      a path that does not exist yet
    {file}     a text file                                {empty}    an empty directory
    {foreign}  a directory holding someone else's file    {ro}       a read-only directory
    {junk}     a text file named data.parquet             {evil}     a run whose checkpoint carries a pickle payload
    {noisy}    {run} plus a file entropy-lab did not write
    {badcfg}   {run} with a mistyped value in config.json {badjson}  {run} with config.json that is not JSON
    {badmetrics} {run} with a corrupt metrics.parquet     {badtrace} {run} with a truncated trace file
    {nocol}    {run} whose traces lack omega_softmax
    {usertrace} {run} plus traces/notes.txt           {modelckpt} {run} plus a model folder in checkpoints/
    {poster}   {run} plus figures/poster.png          {ghost}    {run} spelled through a missing folder
    {linked}   {run} whose traces/ is a link to a folder outside it
    {locked}   {run} locked by a live process (the test's own pid)
    {userout}  a directory holding a user's report.md
    {strtrace} {run} whose first trace's delta_entropy holds strings
    {badprob}  {run} with a probability of 1.5 in a trace   {stepmix}  {run} whose step_000001 holds step 7
    {deepcfg}  {run} with config.json nested 5000 deep      {unkcfg}   {run} with an unknown config key
    {hugecfg}  {run} with a 5 MB config.json                {strmetrics} {run} with a string metrics column
    {dupsteps} {run} whose metrics repeat a step
    {escape}   {run} whose manifest names ../../outside      {absolute} {run} whose manifest names /etc/passwd
    {unlisted} {run} with a checkpoint file the manifest omits
    {badweights} {run} whose checkpoint (without manifest) has a damaged safetensors header

Library cases: (id, name of a function in ``test_bad_inputs.py``, fragments). Each function
performs one bad call; the test asserts it raises one ``EntropyLabError`` line with the fragments.
"""

BASE = (
    "--method grpo --task arithmetic --model {model} --set prompts_per_step=4 --set samples_per_prompt=4 "
    "--set max_new_tokens=4 --set eval_prompts=8 --set eval_k=2 --set eval_every=1 --set trace_every=1 "
    "--set checkpoint_every=2 --quiet"
)
"""The settings {run} was trained with (2 steps)."""

# fmt: off
CLI_CASES = [
    # --- configuration values: range, type, finiteness --------------------------------------
    ("steps-negative", "train {base} --set steps=-1 --out {new}", ["'steps'", "[1, 1000000000]", "--set steps="]),
    ("steps-zero", "train --steps 0 --out {new}", ["'steps'", "[1, "]),
    ("clip-eps-low-above-1", "train {base} --set clip_eps_low=2 --out {new}", ["clip_eps_low", "[0, 1)"]),
    ("lr-nan", "train {base} --set lr=nan --out {new}", ["'lr'", "finite"]),
    ("lr-inf", "train {base} --set lr=inf --out {new}", ["'lr'", "finite"]),
    ("temperature-zero", "train {base} --set temperature=0 --out {new}", ["temperature", "> 0"]),
    ("max-new-tokens-zero", "train {base} --set max_new_tokens=0 --out {new}", ["max_new_tokens", "[1, 1048576]"]),
    ("prompts-per-step-zero", "train {base} --set prompts_per_step=0 --out {new}", ["prompts_per_step"]),
    ("eval-k-zero", "train {base} --set eval_k=0 --out {new}", ["eval_k", "[1, 65536]"]),
    ("top-p-above-1", "train {base} --set top_p=1.5 --out {new}", ["top_p", "(0, 1]"]),
    ("seed-negative", "train {base} --set seed=-1 --out {new}", ["'seed'", "[0, 9223372036854775807]"]),
    ("dual-clip-below-1", "train {base} --set dual_clip_c=0.5 --out {new}", ["dual_clip_c", "> 1"]),
    ("mini-batches-above-batch", "train {base} --set mini_batches=100 --out {new}", ["mini_batches", "exceeds"]),
    ("device-unknown", "train {base} --set device=tpu --out {new}", ["device", "cpu"]),
    ("cov-selection-unknown", "train {base} --set cov_selection=local --out {new}", ["cov_selection", "per-call"]),
    ("int-field-given-text", "train {base} --set samples_per_prompt=abc --out {new}", ["samples_per_prompt", "expects int"]),
    ("float-field-given-text", "train --set lr=fast --out {new}", ["expects float"]),
    ("unknown-config-key", "train --set lrr=1 --out {new}", ["unknown config key", "lr"]),
    ("set-without-equals", "train --set lr --out {new}", ["key=value"]),
    ("set-with-a-space", "train --set lr 1e-3 --out {new}", ["key=value", "--set lr=1e-3"]),
    ("config-key-mistyped", "train --set clip_eps_hgh=0.3 --out {new}", ["unknown config key", "did you mean 'clip_eps_high'"]),
    ("train-stray-argument", "train steer --out {new}", ["unexpected argument", "steer"]),
    ("unknown-objective", "train {base} --set objective=nope --out {new}", ["objective", "ppo"]),
    ("method-overridden-by-set", "train {base} --set method=steer --out {new}", ["chosen by name"]),
    ("steps-given-twice", "train {base} --steps 2 --set steps=1 --out {new}", ["given twice", "--steps 2"]),
    ("unknown-method", "train --method nope --out {new}", ["unknown method", "steer"]),
    ("method-mistyped", "train --method stear --out {new}", ["unknown method", "did you mean 'steer'"]),
    # --- where the run goes ----------------------------------------------------------------------
    ("out-is-a-file", "train {base} --out {file}", ["is a file"]),
    ("out-in-read-only-dir", "train {base} --out {ro}/run", ["permission denied", "writable --out"]),
    ("out-is-a-model", "train {base} --out {model}", ["Hugging Face model", "another --out"]),
    ("overwrite-a-model", "train {base} --out {model} --overwrite", ["Hugging Face model"]),
    ("overwrite-a-foreign-dir", "train {base} --out {foreign} --overwrite", ["not empty", "no entropy-lab run"]),
    ("out-holds-a-run", "train {base} --out {run}", ["already holds a run", "--resume", "--overwrite"]),
    ("overwrite-with-unknown-files", "train {base} --out {noisy} --overwrite", ["did not write", "notes.txt"]),
    ("overwrite-cwd", "train {base} --out . --overwrite", ["working directory"], "{run}"),
    ("overwrite-parent-of-cwd", "train {base} --out .. --overwrite", ["working directory"], "{run}/traces"),
    ("resume-and-overwrite", "train {base} --out {run} --resume --overwrite", ["exclude each other"]),
    ("overwrite-user-file-in-traces", "train {base} --out {usertrace} --overwrite", ["did not write", "traces/notes.txt"]),
    ("overwrite-model-in-checkpoints", "train {base} --out {modelckpt} --overwrite", ["did not write", "checkpoints/my-model/"]),
    ("overwrite-poster-in-figures", "train {base} --out {poster} --overwrite", ["did not write", "figures/poster.png"]),
    ("out-through-missing-folder", "train {base} --out {ghost}", ["already holds a run", "--overwrite"]),
    ("overwrite-linked-traces", "train {base} --out {linked} --overwrite", ["traces (a symbolic link)"]),
    ("resume-linked-traces", "train {base} --steps 3 --out {linked} --resume", ["symbolic links", "traces"]),
    ("train-on-locked-run", "train {base} --out {locked}", ["another process", "pid"]),
    ("resume-locked-run", "train {base} --steps 3 --out {locked} --resume", ["another process", "pid"]),
    ("overwrite-locked-run", "train {base} --out {locked} --overwrite", ["another process", "pid"]),
    # --- resuming ---------------------------------------------------------------------------------
    ("resume-changed-config", "train {base} --steps 2 --set lr=0.01 --out {run} --resume", ["differs in", "lr"]),
    ("resume-where-no-run", "train {base} --out {empty} --resume", ["no run to resume", "without --resume"]),
    ("resume-other-method", "train --out {run} --resume --method steer", ["differs in method", "own config.json"]),
    ("resume-corrupt-metrics", "train {base} --steps 3 --out {badmetrics} --resume", ["metrics.parquet", "not a readable Parquet"]),
    # --- inputs that are missing, empty, truncated or foreign -------------------------------------
    ("model-missing", "train {base} --model {new} --out {new}", ["not a Hugging Face model directory"]),
    ("model-foreign-dir", "train {base} --model {foreign} --out {new}", ["not a Hugging Face model directory"]),
    ("dataset-missing", "train {base} --dataset {new}.parquet --out {new}", ["does not exist"]),
    ("dataset-not-parquet", "train {base} --dataset {junk} --out {new}", ["could not be read as Parquet"]),
    ("trace-missing-run", "trace --run {new}", ["no run or checkpoint directory"]),
    ("trace-a-file", "trace --run {file}", ["is a file"]),
    ("trace-empty-dir", "trace --run {empty}", ["not a run directory", "config.json"]),
    ("trace-a-model", "trace --run {model}", ["Hugging Face model"]),
    ("trace-malformed-config", "trace --run {badjson}", ["config.json", "not valid JSON"]),
    ("trace-mistyped-config", "trace --run {badcfg} --step 2", ["not a valid run configuration", "steps"]),
    ("trace-checkpoint-short-name", "trace --run {run}/checkpoints/step_5", ["no checkpoint at step 5", "step_000002"]),
    ("trace-step-without-checkpoint", "trace --run {run} --step 7", ["no checkpoint at step 7", "step_000002"]),
    ("trace-step-contradicts-run", "trace --run {ckpt} --step 1", ["--step"]),
    ("trace-truncated-trace", "trace --run {badtrace}", ["not a readable Parquet"]),
    ("trace-bad-format", "trace --run {run} --format xml", ["--format", "json"]),
    ("trace-malicious-checkpoint", "trace --run {evil}/checkpoints/step_000002", ["refusing to load", "exec"]),
    ("trace-unknown-method", "trace --run {run} --method nope", ["unknown method"]),
    ("figures-missing-run", "figures --run {new}", ["no run directory"]),
    ("figures-missing-column", "figures --run {nocol}", ["omega_softmax"]),
    ("figures-corrupt-metrics", "figures --run {badmetrics}", ["metrics.parquet", "not a readable Parquet"]),
    ("figures-out-over-users-file", "figures --run {run} --out {userout}", ["did not write", "report.md"]),
    # --- files of a run directory are untrusted ---------------------------------------------------
    ("trace-string-column", "trace --run {strtrace}", ["step_000001.parquet", "'delta_entropy'", "not floats"]),
    ("trace-probability-out-of-range", "trace --run {badprob}", ["'prob'", "outside [0, 1]"]),
    ("trace-step-not-its-name", "trace --run {stepmix}", ["step_000001.parquet", "records of step 7"]),
    ("trace-config-nested-deeply", "trace --run {deepcfg}", ["config.json", "nested too deeply"]),
    ("trace-config-unknown-key", "trace --run {unkcfg}", ["config.json", "unknown config key", "lrr"]),
    ("trace-config-huge", "trace --run {hugecfg}", ["config.json", "bytes, more than"]),
    ("figures-metrics-string-column", "figures --run {strmetrics}", ["metrics.parquet", "'reward/mean'", "not numbers"]),
    ("figures-metrics-repeated-step", "figures --run {dupsteps}", ["metrics.parquet", "unique, ascending"]),
    ("trace-manifest-path-escapes", "trace --run {escape}/checkpoints/step_000002", ["checkpoint.json", "not a path inside"]),
    ("trace-manifest-absolute-path", "trace --run {absolute}/checkpoints/step_000002", ["/etc/passwd", "not a path inside"]),
    ("trace-checkpoint-unlisted-file", "trace --run {unlisted}/checkpoints/step_000002", ["extra.bin", "does not list"]),
    ("trace-damaged-safetensors", "trace --run {badweights}/checkpoints/step_000002", ["model.safetensors", "header length"]),
    ("resume-config-unknown-key", "train {base} --steps 2 --out {unkcfg} --resume", ["unknown config key", "lrr"]),
    # --- edges of the configuration, refused before any directory exists ---------------------------
    ("seed-above-rng-range", "train {base} --set seed=9223372036854775808 --out {new}", ["'seed'", "[0, 9223372036854775807]"]),
    ("prompts-per-step-absurd", "train {base} --set prompts_per_step=1000000000000 --out {new}", ["prompts_per_step", "[1, 1048576]"]),
    ("rollout-batch-absurd", "train {base} --set prompts_per_step=1048576 --set samples_per_prompt=1024 --out {new}", ["sequences per step"]),
    ("evaluation-absurd", "train {base} --set eval_prompts=1048576 --set eval_k=1024 --out {new}", ["sequences per evaluation"]),
    ("scale-min-above-max", "train {base} --set entropy_target_scale_min=3 --out {new}", ["entropy_target_scale_min (3.0) exceeds"]),
    ("clip-cov-bounds-contradict", "train {base} --set clip_cov_lb=6 --out {new}", ["clip_cov_lb must be below clip_cov_ub"]),
    ("prompt-longer-than-positions", "train {base} --set max_new_tokens=200 --out {new}", ["max_new_tokens=200", "positions, but the model has 64"]),
    ("compare-repeated-method", "compare grpo grpo --out {new} --quiet", ["more than once"]),
    ("compare-unknown-method", "compare grpo nope --out {new} --quiet", ["unknown method"]),
    ("compare-zero-seeds", "compare grpo --seeds 0 --out {new} --quiet", ["--seeds", "at least 1"]),
    ("compare-one-method", "compare grpo --out {new} --quiet", ["two methods", "entropy-lab train --method grpo"]),
    ("compare-set-with-a-space", "compare grpo steer --set lr 1e-3 --out {new} --quiet", ["--set lr=1e-3"]),
]

LIBRARY_CASES = [
    ("loss-nan-advantage", "loss_with_nan_advantage", ["advantages", "non-finite"]),
    ("trainer-invalid-config", "trainer_with_zero_steps", ["'steps'", "[1, "]),
    ("config-json-wrong-type", "config_from_mistyped_dict", ["'lr'", "expects float"]),
    ("config-json-unknown-key", "config_from_dict_with_unknown_key", ["unknown config key", "lrr"]),
    ("records-not-parquet", "load_records_of_a_text_file", ["not a readable Parquet"]),
    ("records-metadata-not-json", "load_records_with_bad_metadata", ["unreadable entropy_lab metadata"]),
    ("checkpoint-malicious", "load_malicious_trainer_state", ["refusing to load", "exec"]),
    ("checkpoint-truncated", "load_truncated_trainer_state", ["damaged"]),
    ("run-create-on-model", "create_run_on_a_model", ["Hugging Face model"]),
    ("trl-output-dir-on-a-model", "trl_overwrite_run_on_a_model", ["Hugging Face model", "output_dir"]),
    ("trl-output-dir-foreign", "trl_run_in_a_foreign_dir", ["not empty", "output_dir"]),
    ("trl-override-trl-field", "trl_override_of_a_grpo_config_field", ["lr (GRPOConfig's learning_rate)"]),
    ("trl-overrides-not-mapping", "trl_overrides_not_a_mapping", ["method_overrides must be a mapping"]),
    ("trl-trace-every-text", "trl_trace_every_as_text", ["trace_every must be a whole number", "'5'"]),
    ("trl-controller-method", "trl_controller_method", ["cannot run inside TRL's loss", "use_adaptive_entropy"]),
    ("records-string-column", "load_records_with_a_string_column", ["'delta_entropy'", "not floats"]),
    ("records-empty", "load_records_without_rows", ["holds no records"]),
    ("json-nested-deeply", "parse_deeply_nested_json", ["nested too deeply"]),
    ("safetensors-offsets-outside", "check_safetensors_with_offsets_outside", ["lies outside the file"]),
    ("manifest-unknown-entry", "read_manifest_with_an_unknown_entry", ["entries entropy-lab does not write"]),
    ("manifest-wrong-step", "read_manifest_of_another_step", ["manifest of step 5"]),
    ("update-makes-parameters-non-finite", "train_with_absurd_weight_decay", ["step 1", "parameters non-finite", "weight_decay=1e+38"]),
    ("update-makes-logits-non-finite", "train_with_weight_decay_overflowing_logits", ["step 1", "logits non-finite", "lr=10"]),
    ("tracer-nan-advantage", "tracer_with_nan_advantage", ["advantages is NaN", "sample 1"]),
    ("tracer-inf-old-logprob", "tracer_with_inf_old_logprob", ["old_logprobs is NaN or infinite"]),
    ("tracer-output-without-logits", "tracer_on_a_model_without_logits", ["without a (B, T, V) .logits"]),
    ("tracer-step-reused", "tracer_step_context_reused", ["already used", "tracer.step(...) again"]),
    ("tracer-step-nested", "tracer_step_nested_on_one_tracer", ["already tracing", "second EntropyTracer"]),
    ("tracer-max-positions-zero", "tracer_with_zero_max_positions", ["max_positions", ">= 1"]),
    ("tracer-max-positions-negative", "tracer_with_negative_max_positions", ["max_positions", ">= 1"]),
    ("tracer-advantages-wrong-shape", "tracer_with_advantages_of_wrong_shape", ["advantages must have shape"]),
    ("tracer-response-mask-wrong-shape", "tracer_with_response_mask_of_wrong_shape", ["response_mask must have shape"]),
    ("tracer-all-zero-mask", "tracer_with_all_zero_response_mask", ["selects no tokens"]),
]
# fmt: on
