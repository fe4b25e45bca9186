"""The names of the Celery tasks: the API sends them, the worker runs them, both read them here."""

RUN_JOB = "gptqd.run_job"
RUN_VERIFICATION = "gptqd.run_verification"
