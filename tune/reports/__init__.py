"""What a finished search shows: the search report (MLflow artifacts, HTML) and its figures. Never imports engine."""
