"""Running a search: plan -> run -> wrap-up, the tuner and searcher wiring, Optuna storage, the budget
gate and ledger, signals, progress, cluster checks, the baseline gain and the search lock."""
