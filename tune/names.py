"""The names a search leaves behind, in one place: MLflow tags and run roles, and the folders and
files of a search's storage. Tools that read a search (``tune/report.py``, the MLflow UI, a
notebook) rely on them; docs/design.md lists them as public contracts."""

# ----------------------------------------------------------------------------- MLflow tags
ROLE = "lpt.role"  # study | trial | phase1
ROLE_STUDY, ROLE_TRIAL, ROLE_PHASE1 = "study", "trial", "phase1"
PARENT = "mlflow.parentRunId"  # a trial run's search (MLflow's own nesting tag)
TRIAL_ID = "lpt.trial_id"  # Ray's trial id
NODE = "lpt.node"  # the Ray node that ran the trial
PHASE1_KEY = "lpt.phase1_key"  # the phase-1 cache key a trial (or a phase-1 run) used
SEARCH = "lpt.search"  # parent run: the search's folder name
STORAGE = "lpt.storage"  # parent run: the search folder's absolute path or URI (no credentials)
BEST = "lpt.best"  # the best trial's run: "true"
BEST_TRIAL_ID = "lpt.best_trial_id"  # parent run
CONFIRMED_TRIAL = "lpt.confirmed_trial"  # parent run: the trial whose config --confirm retrained
TEST_EXPOSED = "lpt.test_exposed"  # parent run: every trial id evaluated on test, first tested first
CONFIRMATION = "lpt.confirmation"  # parent run: --confirm's verdict, confirmed | not confirmed
PARETO_TRIALS = "lpt.pareto_trials"  # parent run, multi-objective studies: comma-separated trial ids
STATUS = "lpt.status"  # trial run: completed | early_stopped | failed | interrupted
INTERRUPTED_BY = "lpt.interrupted"  # parent run of a search stopped by a signal: SIGINT | SIGTERM
MODEL_URI = "lpt.model_uri"  # parent run: models:/NAME/VERSION of the registered best trial
REGISTER_ERROR = "lpt.register_error"  # parent run: why --register failed
TRACKING_FAILURES = "lpt.tracking_failures"  # parent run: the MLflow calls that failed, JSON
# a registered model version's tags (besides TRIAL_ID and its accuracies)
VERSION_PARENT_RUN, VERSION_STUDY, VERSION_PROFILE = "lpt.parent_run_id", "lpt.study", "lpt.profile"
ERROR = "lpt.error"  # a failed run's reason
REPORT_ERROR = "lpt.report_error"  # why a run has no report
DEVICE, GPU_IDS = "lpt.device", "lpt.gpu_ids"
RESUMED, RESUMED_AT_EPOCH = "lpt.resumed", "lpt.resumed_at_epoch"
BASELINE = "lpt.baseline"  # the baseline trial's run (the profile's own values): "true"
OPTUNA_STORAGE = "lpt.optuna_storage"  # parent run: the URL optuna.load_study takes
OPTUNA_STUDY = "lpt.optuna_study"  # parent run: the study's name in that storage
BUDGET = "lpt.budget"  # parent run: its cost budget (budget.gpu_hours|cpu_hours, on_exhausted), or off;
# trials.parquet's metadata key: what the budget did (budget.outcome), JSON
BUDGET_ENDED = "lpt.budget_ended"  # parent run with a budget: "true" when it kept trials from starting

# ----------------------------------------------------------------------------- search storage
PHASE1_CACHE = "phase1-cache"  # under the storage root, shared by every search
SEARCH_FILE = "search.json"  # in a search folder: the record --resume reads
SEARCH_LOCK = "search.lock"  # in a local search folder: held (flock) by the driver running it
SHARED_CHECK = ".lpt-shared-check"  # the cluster's storage check: markers published and read back (then removed)
PROFILE_FILE = "profile.yaml"  # the profile as the search ran it (also a parent-run artifact)
TABLE_FILE = "trials.parquet"  # one row per trial
OPTUNA_FILE = "optuna.db"  # the search's Optuna study (SQLite), unless LPT_OPTUNA_STORAGE
OPTUNA_TRIAL_ID = "trial_id"  # user attribute of each Optuna trial: Ray's trial id
PROMPTS_DIR = "prompts"  # <trial id>.safetensors of the trials that ran every epoch
REPORT_DIR = "report"  # the report's folder, and its artifact folder in MLflow
REPORT_TABLE, REPORT_PAGE = "trials.csv", "summary.html"
# in a phase-1 cache entry (PHASE1_CACHE/<key>/)
PHASE1_PROMPTS, PHASE1_INFO, PHASE1_STATE = "prompts.safetensors", "info.json", "state.safetensors"
